"""The lean embedded Ray's dashboard agent script: it runs the agent it is given, as Ray would, minus
the agent's search for dashboard modules when none can load. A stand-in agent script records how it
was run; the real agent started this way is tested in defs/test_resources.py."""

import json
import subprocess
import sys
import textwrap

from imgtune_assets.core.embedded_ray import LEAN_AGENT_SCRIPT


def test_the_agent_runs_as_ray_would_run_it_with_its_module_search_cut_only_when_nothing_could_load(tmp_path):
    agent_dir = tmp_path / "dashboard"
    agent_dir.mkdir()
    agent = agent_dir / "agent.py"
    agent.write_text(textwrap.dedent("""
        import json, sys
        import ray.dashboard.utils as dashboard_utils
        from ray._private.utils import get_dashboard_dependency_error
        print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0],
                          "modules": len(dashboard_utils.get_all_modules(dashboard_utils.DashboardAgentModule)),
                          "minimal": get_dashboard_dependency_error() is not None}))
    """))
    run = subprocess.run([sys.executable, "-u", LEAN_AGENT_SCRIPT, str(agent), "--node-ip-address=127.0.0.1",
                          "--log-dir=/x"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["name"] == "__main__" and seen["path0"] == str(agent_dir)
    assert seen["argv"] == [str(agent), "--node-ip-address=127.0.0.1", "--log-dir=/x"]
    # The project installs Ray's minimal package: no dashboard module can load, so none is searched for
    # (Ray's search logs each module it tries, and what it found).
    assert seen["minimal"] and seen["modules"] == 0
    assert "Available modules" not in run.stderr and "cannot be loaded" not in run.stderr
