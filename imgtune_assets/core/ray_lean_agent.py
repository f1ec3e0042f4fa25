"""Ray's dashboard agent, started without its search for dashboard modules when Ray is the minimal
install (the lean embedded Ray's fifth shortcut; see ``embedded_ray``).

Run by the raylet as ``python -u ray_lean_agent.py <path of Ray's dashboard/agent.py> <its arguments>``.
Ray's agent imports every module under ``ray.dashboard.modules`` to find those it can load; without
``ray[default]``'s dependencies none loads (``Available modules: []`` in its log), but the imports
still delay the raylet's start, which waits for the agent. With those
dependencies installed, nothing is skipped. Plain script: no imgtune import (the raylet runs it with
Ray's Python path), no Dagster.
"""

import os
import runpy
import sys


def main() -> None:
    agent = sys.argv[1]
    try:
        import ray.dashboard.utils as dashboard_utils
        from ray._private.utils import get_dashboard_dependency_error

        if get_dashboard_dependency_error() is not None:
            dashboard_utils.get_all_modules = lambda module_type: []
    except (ImportError, AttributeError):  # Ray moved them: the agent searches as shipped
        pass
    # The agent as Ray runs it: its own folder first on the path, its arguments after its name.
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(agent)
    runpy.run_path(agent, run_name="__main__")


if __name__ == "__main__":
    main()
