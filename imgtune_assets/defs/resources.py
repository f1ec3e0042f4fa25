"""Resources: where sweeps write, and the Ray connection."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import psutil
from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from imgtune_assets.core.paths import default_output_dir, sweep_output_dir

RAY_ADDRESS_ENV = "IMGTUNE_RAY_ADDRESS"
# Set before an embedded Ray starts: Ray then listens on and advertises 127.0.0.1 only
# (by default Ray 2.60 listens on every interface).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Start-up and stop of the embedded Ray, measured on 2 cores (benchmarks/sweep_bench.py):
# - the raylet connects to its own object store, started by another thread a moment earlier, and
#   retries after 1 s when it comes too early — which it does in about half the starts under load: poll
#   every 20 ms instead (the same 10 s in total);
# - the driver waits up to 1 s at shutdown to flush task events to GCS (they feed the dashboard and the
#   state API, which the embedded Ray does not run).
EMBEDDED_RAY_ENV = {
    **LOOPBACK_ENV,
    "RAY_raylet_client_connect_timeout_milliseconds": "20",
    "RAY_raylet_client_num_connect_attempts": "500",
    "RAY_task_events_shutdown_flush_timeout_ms": "0",
}


class SweepResource(ConfigurableResource):
    """Where sweeps write: each sweep under ``<output_dir>/<sweep name>/`` (reports, trial results and
    the stored asset values). The sweep itself is bound to its assets by the sweep factory."""

    output_dir: str = Field(
        description="Folder for reports, trial results and stored asset values (one sub-folder per sweep "
        "name). Defaults to $IMGTUNE_OUTPUT_DIR, else outputs/ in the project.",
    )

    @classmethod
    def from_environment(cls) -> "SweepResource":
        return cls(output_dir=str(default_output_dir()))

    def sweep_dir(self, sweep_name: str) -> Path:
        return sweep_output_dir(Path(self.output_dir), sweep_name)


class RayResource(ConfigurableResource):
    """A Ray connection: an embedded local Ray by default, or an existing cluster by ``address``.

    Inside a Ray worker (a step run by ``ray_executor``) the worker's own connection is reused.
    """

    address: Optional[str] = Field(
        default=None,
        description="Ray cluster address: 'HOST:PORT', 'auto' or 'ray://HOST:10001'. Unset: $IMGTUNE_RAY_ADDRESS "
        "if set, else an embedded local Ray on 127.0.0.1 that lives as long as the run.",
    )
    num_cpus: Optional[int] = Field(
        default=None, description="CPUs for the embedded local Ray (default: all of this machine's). "
        "Ignored when connecting to a cluster."
    )
    namespace: str = Field(default="imgtune", description="Ray namespace for imgtune's tasks.")
    runtime_env: Optional[dict[str, Any]] = Field(
        default=None,
        description="Ray runtime_env for a cluster connection, e.g. {'py_modules': [...]} so remote nodes "
        "get imgtune's code. By default imgtune ships its own package when connecting by address.",
    )
    max_retries: int = Field(
        default=3, description="Times Ray re-runs an experiment task whose worker died (tasks are idempotent)."
    )

    _started_here: bool = PrivateAttr(default=False)
    _connect_seconds: float = PrivateAttr(default=0.0)

    @property
    def connect_seconds(self) -> float:
        """How long connecting (or starting the embedded Ray) took in this process; 0 if reused."""
        return self._connect_seconds

    def resolved_address(self) -> Optional[str]:
        return self.address or os.environ.get(RAY_ADDRESS_ENV) or None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Connecting is left to the step (``connect()``), so that it can decode the images while the
        # embedded Ray starts: the two overlap instead of adding up.
        pass

    def connect(self, log: Optional[logging.Logger] = None) -> None:
        """Connect to the cluster, or start the embedded local Ray; a no-op when already connected."""
        address = self.resolved_address()
        started = time.perf_counter()  # Ray's start-up includes importing it (~0.3 s)
        if not address:
            # Before the first `import ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported.
            for key, value in EMBEDDED_RAY_ENV.items():
                os.environ.setdefault(key, value)
        import ray

        if ray.is_initialized():
            return  # already connected: inside a Ray worker, or the caller connected
        if address:
            ray.init(
                address=address,
                namespace=self.namespace,
                runtime_env=self.runtime_env if self.runtime_env is not None else default_runtime_env(),
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        else:
            with _lean_head_node():
                ray.init(
                    # "local": always a new embedded Ray, never a cluster found through RAY_ADDRESS or
                    # /tmp/ray/ray_current_cluster (left by any `ray start --head` on this machine).
                    address="local",
                    num_cpus=self.num_cpus,
                    namespace=self.namespace,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    runtime_env=self.runtime_env,
                )
        self._started_here = True
        self._connect_seconds = time.perf_counter() - started
        if log:
            resources = ray.cluster_resources()
            log.info(f"Ray connected ({address or 'embedded local'}): {int(resources.get('CPU', 0))} CPUs, "
                     f"{len(ray.nodes())} node(s)")

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._started_here:
            import ray

            if not self.resolved_address():
                _stop_embedded_ray_at_once(ray)
            ray.shutdown()
            self._started_here = False
            _skip_final_collection_at_exit()


def _stop_embedded_ray_at_once(ray) -> None:
    """Make the coming ``ray.shutdown()`` kill the embedded Ray's processes at once.

    By default it sends SIGTERM and waits up to a second per process (about 1.4 s at the end of every
    run). The embedded Ray holds nothing that needs a graceful stop: every result is saved by then.
    A raylet killed at once cannot stop the agents and workers it started, so they are killed too
    (they would otherwise live as long as this process). This reaches into Ray's private node object;
    if a Ray release moves it, the graceful stop remains.
    """
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    graceful = getattr(node, "kill_all_processes", None)
    if graceful is None:
        return

    def immediately(check_alive: bool = False, allow_graceful: bool = True, wait: bool = False):
        # Only processes still running: a pid that Ray already reaped may belong to someone else now.
        started = _descendants(info.process.pid for infos in node.all_processes.values() for info in infos
                               if info.process.poll() is None)
        result = graceful(check_alive=check_alive, allow_graceful=False, wait=wait)
        for proc in started:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return result

    node.kill_all_processes = immediately


def _descendants(pids) -> list[psutil.Process]:
    """Every process below ``pids``, from one pass over the process table."""
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc)
    found, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


@contextmanager
def _lean_head_node():
    """Start the embedded Ray without the three head processes it has no use for.

    A local ``ray.init`` also starts the dashboard's API server (even with ``include_dashboard=False``;
    and it waits ~0.6 s for it to come up), the autoscaler's monitor and the log monitor (which only
    streams worker output to the driver, off here with ``log_to_driver=False``): three Python processes,
    about 1.3 s of CPU at start-up on a 2-core machine, and a little polling all through the sweep. The
    embedded Ray is one node that lives as long as a run, with no dashboard, nothing to autoscale and
    its logs in the session folder; GCS, raylet, the object store, the workers and their agents start as
    usual. Ray offers no switch for these (``ray start`` hides ``--no-monitor``), so their start methods
    on Ray's private ``Node`` are skipped for the duration of this ``ray.init`` only; should a Ray
    release rename them, the embedded Ray starts in full, as before.
    """
    try:
        from ray._private.node import Node
    except ImportError:  # pragma: no cover - Ray moved its private module: start in full
        yield
        return
    names = ("start_api_server", "start_monitor", "start_log_monitor")
    originals = {name: Node.__dict__.get(name) for name in names}
    if any(method is None for method in originals.values()):
        yield
        return

    def skipped(self, *args, **kwargs):
        return None

    for name in names:
        setattr(Node, name, skipped)
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(Node, name, method)


def _skip_final_collection_at_exit() -> None:
    """Let the process that ran a sweep exit without a last full garbage collection.

    Python's shutdown walks every live object (Dagster, Ray, gRPC and pydantic leave about a million)
    to collect cycles that the exit frees anyway: 0.8 s at the end of every CLI run on 2 cores. Frozen
    objects are skipped; the atexit handlers registered before this one (Ray's, logging's flush,
    Dagster's) still run after it, and nothing else changes while the process lives.
    """
    global _final_collection_skipped
    if not _final_collection_skipped:
        atexit.register(gc.freeze)
        _final_collection_skipped = True


_final_collection_skipped = False


def default_runtime_env() -> dict[str, Any]:
    """Ship imgtune's own package to cluster workers, so nodes need only the dependencies."""
    import imgtune_assets

    return {"py_modules": [str(Path(imgtune_assets.__file__).parent)],
            "env_vars": {"OMP_NUM_THREADS": "1"}}
