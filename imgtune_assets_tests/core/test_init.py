"""The ``core`` package as a whole: plain modules, usable and testable without Dagster or Ray."""

import pkgutil
import subprocess
import sys

import imgtune_assets.core


def test_no_core_module_imports_dagster_ray_or_pandas():
    # pandas is imported where a manifest or report is built (inside functions), never at import: the
    # code location loads these modules, and a sweep's Dagster host must not pay for Ray or pandas.
    modules = sorted(m.name for m in pkgutil.iter_modules(imgtune_assets.core.__path__, "imgtune_assets.core.")
                     if m.name != "imgtune_assets.core.ray_lean_agent")  # a script Ray's raylet runs
    assert len(modules) > 20
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dagster', 'ray', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
