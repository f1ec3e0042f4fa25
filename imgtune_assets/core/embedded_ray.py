"""The embedded local Ray: how imgtune starts and stops the one-node Ray that lives as long as a run.

Public surface:

* ``LOOPBACK_ENV``: the variables that keep a local Ray on 127.0.0.1 (set before Ray is imported).
* ``PRIORITY_ENV``: the embedded Ray's workers run at the command's own priority, not Ray's nicer one.
* ``prepare_environment(lean)``: put them (and, lean, the start-up/shut-down tuning below) into
  ``os.environ``; must run before the process's first ``import ray``.
* ``start_embedded_ray(num_cpus, namespace, runtime_env, lean)``: start it and connect this process.
* ``EmbeddedRayStart``: ``start_embedded_ray`` in a background thread, waited for when Ray is needed.
* ``stop_embedded_ray(lean)``: disconnect and stop it.
* ``RayHost``: an ``EmbeddedRayStart`` in a command that launches runs (``python -m imgtune_assets.cli
  sweep``), shared by them; ``HostedRayConnect`` connects a run to it (``$IMGTUNE_HOSTED_RAY_FILE``).
* ``skip_final_collection_at_exit()``: let the process exit without a last full garbage collection.
* ``lean_from_environment()``: the ``IMGTUNE_RAY_LEAN`` switch.

**The lean switch.** By default (``lean=True``) the embedded Ray is started and stopped with five
shortcuts measured on 2 cores (benchmarks/sweep_bench.py), four of which reach into Ray's *private*
``ray._private`` modules (pinned ``ray==2.60.0``; imgtune_assets_tests/test_pinned_private_apis.py
fails when they move):

1. Ray's internal config variables (``RAY_raylet_client_*``, ``RAY_task_events_shutdown_flush_timeout_ms``)
   that shorten the raylet's connect retries and the driver's task-event flush at shutdown;
2. the head node starts without the dashboard's API server, the autoscaler's monitor and the log
   monitor (their start methods on the private ``Node`` are skipped during ``ray.init``);
3. the stop kills the node's processes at once instead of SIGTERM and up to 1 s of waiting each
   (the private node's ``kill_all_processes`` is wrapped for the coming ``ray.shutdown``);
4. the driver sees its raylet register with GCS at the next short poll instead of at Ray's next 1 s retry
   (``ray._private.services.get_node``, which ``ray.init`` calls while the node starts, is preceded by
   a poll of GCS's node table; the raylet registers only once its agents are up, so Ray's first try
   almost always misses it and the second comes up to a second after it);
5. the raylet, which registers only once its dashboard agent is up, starts that agent through
   ``ray_lean_agent.py``: Ray's own agent, minus its search of every dashboard module for those it can
   load — none, in Ray's minimal install (with ``ray[default]``'s dependencies it searches as shipped)
   (``ray._private.services._build_python_executable_command_memory_profileable``, which builds the
   agent's command line, is wrapped during ``ray.init``).

``lean=False`` turns all five off together: a plain ``ray.init(address="local", ...)`` and
``ray.shutdown()`` with only ``LOOPBACK_ENV`` and ``PRIORITY_ENV``, i.e. Ray as shipped, slower to start and
to stop. Use it when a Ray upgrade is being checked or the embedded Ray misbehaves.
``IMGTUNE_RAY_LEAN=0`` (or ``false``/``no``/``off``) turns it off for every embedded Ray of the
process, whatever the caller asked for; ``RayResource.lean_embedded=False`` turns it off for one
resource.

``skip_final_collection_at_exit`` uses public Python only (``gc.freeze`` at exit) and is not part of
the switch.

No Dagster here; ``import ray`` happens only inside functions (Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is first imported). Ray's private modules are imported in
one place only: ``_ray_private()``.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import psutil

# A Ray cluster to use instead of the embedded Ray (RayResource.address and the apply command's default).
from imgtune_assets.core.paths import RAY_ADDRESS_ENV  # noqa: F401 - also imported from here

LEAN_ENV = "IMGTUNE_RAY_LEAN"
# Set before an embedded Ray starts: Ray then listens on and advertises 127.0.0.1 only
# (by default Ray 2.60 listens on every interface).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray starts its workers 15 steps nicer than its raylet (a cluster node's workers must not starve the
# raylet). The embedded Ray's workers do the command's own work, as a multiprocessing pool's would: at
# the command's priority. With Ray's default, anything else busy on the machine took their CPUs first,
# and a command beside two busy processes ran many times slower.
PRIORITY_ENV = {"RAY_worker_niceness": "0"}
# Ray's internal config, for the lean embedded Ray only (benchmarks/RESULTS.md has the measurements):
# - the raylet connects to its own object store, started by another thread a moment earlier, and
#   retries after 1 s when it comes too early, as it often does on a busy machine: poll every 20 ms
#   instead (the same 10 s in total);
# - the driver waits up to 1 s at shutdown to flush task events to GCS (they feed the dashboard and the
#   state API, which the embedded Ray does not run).
LEAN_TUNING_ENV = {
    "RAY_raylet_client_connect_timeout_milliseconds": "20",
    "RAY_raylet_client_num_connect_attempts": "500",
    "RAY_task_events_shutdown_flush_timeout_ms": "0",
}
EMBEDDED_RAY_ENV = {**LOOPBACK_ENV, **PRIORITY_ENV, **LEAN_TUNING_ENV}
# The head processes the lean start skips, by the name of their start method on Ray's private Node.
SKIPPED_HEAD_PROCESSES = ("start_api_server", "start_monitor", "start_log_monitor")
# The lean start's poll for the raylet's registration: every 20 ms, for as long as Ray itself would
# wait (its raylet_start_wait_time_s); then Ray's own lookup runs, and raises as it would.
REGISTRATION_POLL_SECONDS = 0.02
REGISTRATION_WAIT_SECONDS = 30.0
# The file in which a command that launches runs (``RayHost``) writes its embedded Ray's address.
HOSTED_RAY_ENV = "IMGTUNE_HOSTED_RAY_FILE"
HOSTED_RAY_FILE_NAME = "ray-address.json"
HOSTED_POLL_SECONDS = 0.02
HOSTED_WAIT_SECONDS = 120.0
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Notices of Ray's that the embedded Ray does not pass on: (its logger, how the message begins). Ray's
# private module paths, checked in imgtune_assets_tests/test_pinned_private_apis.py.
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
RAY_WORKER_LOGGER = "ray._private.worker"
RAY_SIGTERM_NOTICE = "SIGTERM handler is not set"

_OFF = ("0", "false", "no", "off")
# The lean start runs Ray's dashboard agent through this script (Ray's name for the agent's process type).
LEAN_AGENT_SCRIPT = str(Path(__file__).with_name("ray_lean_agent.py"))
DASHBOARD_AGENT_PROCESS_TYPE = "dashboard_agent"


def lean_from_environment() -> bool:
    """False when ``$IMGTUNE_RAY_LEAN`` says off (``0``, ``false``, ``no``, ``off``); True otherwise."""
    return os.environ.get(LEAN_ENV, "").strip().lower() not in _OFF


def prepare_environment(lean: bool = True) -> None:
    """Set the loopback variables and token authentication, whatever the environment says (the embedded
    Ray is this machine's alone: an inherited ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` would open it to the
    network, ``RAY_AUTH_MODE=disabled`` to every local process), and the
    worker-priority variables (and, lean, Ray's start/stop tuning) unless already set.

    Must run before this process first imports Ray; Ray's own processes inherit them.
    """
    os.environ.update(LOOPBACK_ENV)
    if "ray" not in sys.modules:
        # Token authentication, whatever the environment says: with an inherited RAY_AUTH_MODE=disabled
        # any local process could run code on this Ray as this user. (Ray reads the mode once, when
        # first imported: a process that imported it before keeps what it read, and must match.)
        os.environ[RAY_AUTH_MODE_ENV] = "token"
    for key, value in (PRIORITY_ENV | LEAN_TUNING_ENV if lean else PRIORITY_ENV).items():
        os.environ.setdefault(key, value)


def start_embedded_ray(num_cpus: Optional[int] = None, namespace: Optional[str] = None,
                       runtime_env: Optional[dict[str, Any]] = None, lean: bool = True) -> None:
    """Start a new one-node Ray on loopback and connect this process to it (``ray.init``).

    Never joins an existing cluster (``address="local"``): not one found through ``RAY_ADDRESS`` nor
    ``/tmp/ray/ray_current_cluster`` (left by any ``ray start --head`` on this machine). No dashboard,
    worker output stays in the session's log files. ``lean`` as in the module's docstring (and off
    when ``$IMGTUNE_RAY_LEAN`` says so).
    """
    lean = lean and lean_from_environment()
    prepare_environment(lean)
    import ray

    # Ray's default for a new local cluster is token authentication, and it says so at every start
    # (unless RAY_AUTH_MODE is set): not news for the embedded Ray. (Setting RAY_AUTH_MODE here instead
    # would break a process that imported Ray before: Ray reads the mode once, when first imported.)
    with _dropped(RAY_AUTH_LOGGER, RAY_AUTH_NOTICE), \
            _lean_head_node(enabled=lean):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            namespace=namespace,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            runtime_env=runtime_env,
        )
    _check_loopback(ray.get_runtime_context().gcs_address)


def _check_loopback(gcs_address: str) -> None:
    """Stop an embedded Ray that is not on loopback: Ray was imported in this process before
    ``prepare_environment`` ran, and read the environment's ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` then."""
    host = gcs_address.rsplit(":", 1)[0]
    if host != "127.0.0.1":
        import ray

        ray.shutdown()
        raise RuntimeError(
            f"the embedded Ray started on {gcs_address}, not on 127.0.0.1, and was stopped: Ray was imported "
            f"in this process before imgtune set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (import Ray after "
            f"imgtune's resource connects, or set that variable to 0 before starting Python)")


@contextmanager
def _dropped(logger: str, prefix: str) -> Iterator[None]:
    """Meanwhile, ``logger``'s messages that start with ``prefix`` are not logged."""
    quiet = _DropMessage(prefix)
    logging.getLogger(logger).addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _RayInBackground:
    """Ray started or connected to in a background thread: ``wait()`` blocks until it is up (and re-raises
    what the start raised), ``stop()`` stops it and ends the thread. Subclasses say how (``_start``,
    ``_stop``) and whether the thread must live as long as Ray does (``_hold_thread``)."""

    _hold_thread = False
    _thread_name = "imgtune-ray-start"

    def __init__(self) -> None:
        self._error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._released = threading.Event()
        self._sigterm_restored = False
        self.seconds = 0.0  # how long the start took, in its thread
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _started(self, error: Optional[BaseException]) -> None:
        """Called in the thread once the start has ended (``error``: what it raised, or None)."""

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            with _dropped(RAY_WORKER_LOGGER, RAY_SIGTERM_NOTICE):
                self._start()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits, and raised there
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started
            try:
                self._started(self._error)
            finally:
                self._ready.set()  # whatever happens, nobody waits for ever
        if self._error is None and self._hold_thread:
            self._released.wait()  # see EmbeddedRayStart: Ray's head processes live while this thread does

    def wait(self) -> None:
        """Block until Ray is up; re-raise here whatever the start raised."""
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def settle(self) -> None:
        """Wait for the start to end, whatever it raised, and then, from the main thread, put the process's
        SIGTERM handler back in front of the crash handler that Ray installed as it connected (for a
        process interrupted during the start, whose handler has changed since)."""
        self._ready.wait()
        self._sigterm_restored = False  # (once more: the start may have ended after the last time)
        self.restore_sigterm()

    def restore_sigterm(self) -> bool:
        """Put this process's own SIGTERM handler back in front of Ray's, once Ray is up; from the
        main thread (elsewhere, and before Ray is up, it does nothing). True once done.

        Ray's driver installs its crash handler for the fatal signals — SIGTERM among them — in front
        of the process's handlers: on SIGTERM it prints a stack dump ("*** SIGTERM received ...", as if
        the process had crashed) and then calls the handler it displaced. Re-installing the process's
        handler (Python's) removes Ray's from SIGTERM; the other signals keep it. (For Ray started or
        connected in the background here; a ``ray.init`` from the main thread sets Ray's own handler.)
        """
        if self._sigterm_restored:
            return True
        if not self._ready.is_set() or threading.current_thread() is not threading.main_thread():
            return False
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:  # (None: a handler not installed from Python, left alone)
            signal.signal(signal.SIGTERM, handler)
        self._sigterm_restored = True
        return True

    @property
    def error(self) -> Optional[BaseException]:
        """What the start raised (None while it runs, or when it succeeded)."""
        return self._error

    def stop(self) -> None:
        """Stop what this started (after its start has ended) and end the thread; a start that failed
        left nothing to stop."""
        self._ready.wait()
        if self._error is None:
            self._stop()
        self._released.set()
        self._thread.join()


class EmbeddedRayStart(_RayInBackground):
    """``start_embedded_ray`` in a background thread, so that Ray's start-up (its processes and the
    driver's connection) overlaps what the run does before it needs Ray; ``wait()`` blocks until it is
    up, ``stop()`` stops it and ends the thread.

    The thread lives as long as the embedded Ray: Ray ties its head processes (GCS, raylet) to the
    *thread* that started them (``PR_SET_PDEATHSIG``, which Linux fires when that thread ends), so a
    starting thread that returned would take the node down with it. Should the process die, they die
    with it, as they do when the main thread starts them.

    ``ray.init`` outside the main thread leaves the process's SIGTERM handler alone (from the main
    thread Ray would replace it with one that exits at once): a run process keeps Dagster's own, which
    turns SIGTERM into an interruption that fails the run cleanly. Ray's warning about that is dropped.
    """

    _hold_thread = True
    _thread_name = "imgtune-embedded-ray-start"

    def __init__(self, num_cpus: Optional[int] = None, namespace: Optional[str] = None,
                 runtime_env: Optional[dict[str, Any]] = None, lean: bool = True) -> None:
        self._kwargs = {"num_cpus": num_cpus, "namespace": namespace, "runtime_env": runtime_env, "lean": lean}
        # Before the thread imports Ray: Ray reads some of these variables when first imported.
        prepare_environment(lean and lean_from_environment())
        super().__init__()

    def _start(self) -> None:
        start_embedded_ray(**self._kwargs)

    def _stop(self) -> None:
        stop_embedded_ray(self._kwargs["lean"])


# ------------------------------------------------------------------ one embedded Ray for a command's runs


class RayHost(EmbeddedRayStart):
    """The embedded Ray of a command that launches runs as subprocesses (``python -m imgtune_assets.cli
    sweep``): started in the command's own process as soon as it begins, so that Ray's start-up overlaps
    Dagster's in the run process (one core does little else while Dagster loads); every run it
    launches connects to it, and the command stops it at the end.

    The runs learn its address from a file (``HOSTED_RAY_ENV`` in their environment: ``env()``),
    written once Ray is up — or with the error if it failed to start, which each run then raises. The
    file is in ``folder``, which the command owns. Ray's workers are not tied to the command: the first
    run's connection takes over the workers Ray prestarts (measured: its first tasks start at once).
    """

    def __init__(self, folder: str | os.PathLike, lean: bool = True) -> None:
        self.file = Path(folder) / HOSTED_RAY_FILE_NAME
        # Ray's local start turns token authentication on unless RAY_AUTH_MODE says otherwise; said
        # here first, so that the runs, launched before Ray is up, are told how to connect (Ray reads
        # the mode once per process). The token stays where Ray keeps it (~/.ray/auth_token).
        os.environ[RAY_AUTH_MODE_ENV] = "token"
        super().__init__(lean=lean)

    def _started(self, error: Optional[BaseException]) -> None:
        from imgtune_assets.core.files import atomic_write_json

        if error is not None:
            atomic_write_json(self.file, {"error": f"{type(error).__name__}: {error}"})
            return
        import ray

        atomic_write_json(self.file, {"address": ray.get_runtime_context().gcs_address})

    def env(self) -> dict[str, str]:
        """What a run's environment needs to connect to this Ray."""
        return {HOSTED_RAY_ENV: str(self.file), RAY_AUTH_MODE_ENV: os.environ[RAY_AUTH_MODE_ENV]}


def hosted_address(file: str | os.PathLike, timeout: float = HOSTED_WAIT_SECONDS) -> str:
    """The address of the embedded Ray that the command which launched this process hosts
    (``RayHost``), once it is up: raises ``RuntimeError`` naming the file if the command's Ray failed
    to start, if nothing is written within ``timeout`` seconds, or if the command has gone."""
    path, parent = Path(file), os.getppid()
    deadline = time.monotonic() + timeout
    while True:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            doc = None
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{path}: unreadable address of the imgtune command's embedded Ray ({exc})") from None
        if doc is not None:
            if doc.get("error"):
                raise RuntimeError(f"the embedded Ray of the imgtune command that launched this run failed to start: "
                                   f"{doc['error']} ({path})")
            return str(doc["address"])
        if os.getppid() != parent:
            raise RuntimeError(f"{path}: the imgtune command that was to start the embedded Ray has exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: the imgtune command's embedded Ray was not up after {timeout:.0f} s")
        time.sleep(HOSTED_POLL_SECONDS)


class HostedRayConnect(_RayInBackground):
    """Connect this process, in a background thread, to the embedded Ray of the command that launched
    it (``RayHost``; ``file`` is ``$IMGTUNE_HOSTED_RAY_FILE``); ``stop()`` disconnects (the command
    stops that Ray). Same machine and Python environment: nothing is shipped to its workers."""

    _thread_name = "imgtune-hosted-ray-connect"

    def __init__(self, file: str | os.PathLike, namespace: Optional[str] = None,
                 runtime_env: Optional[dict[str, Any]] = None, lean: bool = True) -> None:
        self.file = file
        self._kwargs = {"namespace": namespace, "runtime_env": runtime_env}
        prepare_environment(lean and lean_from_environment())
        super().__init__()

    def _start(self) -> None:
        address = hosted_address(self.file)
        import ray

        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **self._kwargs)

    def _stop(self) -> None:
        import ray

        ray.shutdown()


def stop_embedded_ray(lean: bool = True) -> None:
    """Disconnect from the embedded Ray this process started, and stop it (``ray.shutdown``).

    Lean: its processes are killed at once rather than stopped gracefully (see
    ``_stop_at_once``). A no-op when Ray is not initialized.
    """
    import ray

    if not ray.is_initialized():
        return
    if lean and lean_from_environment():
        _stop_at_once()
    ray.shutdown()


def skip_final_collection_at_exit() -> None:
    """Let the process that ran a sweep exit without a last full garbage collection.

    Python's shutdown walks every live object (Dagster, Ray, gRPC and pydantic leave about a million)
    to collect cycles that the exit frees anyway, a noticeable pause at the end of every CLI run. Frozen
    objects are skipped; the atexit handlers registered before this one (Ray's, logging's flush,
    Dagster's) still run after it, and nothing else changes while the process lives.
    """
    global _final_collection_skipped
    if not _final_collection_skipped:
        atexit.register(gc.freeze)
        _final_collection_skipped = True


_final_collection_skipped = False


def final_collection_skipped() -> bool:
    """Whether ``skip_final_collection_at_exit`` ran in this process."""
    return _final_collection_skipped


# --------------------------------------------------------------------------- Ray's private API


def _ray_private():
    """The one place imgtune imports Ray's private modules: ``(Node class, ray._private.worker,
    ray._private.services, ray._raylet.GcsClient, ray._private.internal_api)``.

    ``None`` when a Ray release has moved them: the lean shortcuts are then skipped and the embedded
    Ray starts and stops as shipped. Pinned: ray==2.60.0 (imgtune_assets_tests/test_pinned_private_apis.py).
    """
    try:
        from ray._private import internal_api, services, worker
        from ray._private.node import Node
        from ray._raylet import GcsClient
    except ImportError:  # pragma: no cover - Ray moved its private modules
        return None
    return Node, worker, services, GcsClient, internal_api


def spilled_bytes_total(gcs_address: str) -> Optional[int]:
    """Bytes the connected Ray cluster's object stores have spilled to disk since they started, summed
    over its nodes (what ``ray memory --stats-only`` shows), or None when it cannot be asked. Ray has no
    public API for it: ``ray._private.internal_api`` (pinned ray==2.60.0,
    imgtune_assets_tests/test_pinned_private_apis.py); read by runs to report spilling."""
    private = _ray_private()
    if private is None:
        return None
    internal_api = private[4]
    try:
        reply = internal_api.get_memory_info_reply(internal_api.get_state_from_address(gcs_address),
                                                   timeout_seconds=10)
        return int(reply.store_stats.spilled_bytes_total)
    except Exception:  # noqa: BLE001 - a report of spilling must never fail the run it describes
        return None


@contextmanager
def _lean_head_node(enabled: bool = True) -> Iterator[None]:
    """Start the embedded Ray without the three head processes it has no use for.

    A local ``ray.init`` also starts the dashboard's API server (even with ``include_dashboard=False``;
    and it waits for it to come up), the autoscaler's monitor and the log monitor (which only streams
    worker output to the driver, off here with ``log_to_driver=False``): three Python processes whose
    start-up competes for the CPUs the sweep is starting on, and a little polling all through it. The
    embedded Ray is one node that lives as long as a run, with no dashboard, nothing to autoscale and
    its logs in the session folder; GCS, raylet, the object store, the workers and their agents start as
    usual. Ray offers no switch for these (``ray start`` hides ``--no-monitor``), so their start methods
    on Ray's private ``Node`` are skipped for the duration of this ``ray.init`` only; should a Ray
    release rename them, the embedded Ray starts in full, as before.
    """
    private = _ray_private() if enabled else None
    if private is None:
        yield
        return
    node_class, _, services, gcs_client, _ = private
    originals = {name: node_class.__dict__.get(name) for name in SKIPPED_HEAD_PROCESSES}
    if any(method is None for method in originals.values()):
        yield
        return

    def skipped(self, *args, **kwargs):
        return None

    for name in SKIPPED_HEAD_PROCESSES:
        setattr(node_class, name, skipped)
    get_node = getattr(services, "get_node", None)
    if get_node is not None:
        services.get_node = _after_registration(get_node, gcs_client)
    python_command = getattr(services, "_build_python_executable_command_memory_profileable", None)
    if python_command is not None:
        services._build_python_executable_command_memory_profileable = _lean_agent_command(python_command)
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(node_class, name, method)
        if get_node is not None:
            services.get_node = get_node
        if python_command is not None:
            services._build_python_executable_command_memory_profileable = python_command


def _lean_agent_command(python_command):
    """Ray's builder of its Python processes' command lines, with the dashboard agent's run through
    ``ray_lean_agent.py`` (which then runs Ray's agent script, the next word of the command)."""
    def command(component, *args, **kwargs):
        words = python_command(component, *args, **kwargs)
        if component == DASHBOARD_AGENT_PROCESS_TYPE:
            return [*words, LEAN_AGENT_SCRIPT]
        return words

    return command


def _after_registration(get_node, gcs_client):
    """Ray's ``services.get_node(gcs_address, node_id)``, called once GCS's node table lists the node.

    ``ray.init`` asks GCS for the new node's record while the raylet is still starting; GCS's lookup
    retries once a second, so the driver would go on up to a second after the raylet registered. Here
    the table is polled every ``REGISTRATION_POLL_SECONDS`` first; Ray's lookup then finds the node at
    once. Any trouble polling leaves the wait to Ray's own lookup, as shipped.
    """

    def polled_first(gcs_address, node_id, *args, **kwargs):
        log = logging.getLogger(__name__)
        try:
            client = gcs_client(address=gcs_address)
            deadline, looks = time.monotonic() + REGISTRATION_WAIT_SECONDS, 0
            while time.monotonic() < deadline:
                looks += 1
                if any(key.hex() == node_id for key in client.get_all_node_info(timeout=5)):
                    log.debug(f"node {node_id} registered with GCS (seen on look {looks})")
                    break
                time.sleep(REGISTRATION_POLL_SECONDS)
        except Exception as exc:  # noqa: BLE001 - Ray's own lookup below waits (and raises) as shipped
            log.debug(f"polling GCS for node {node_id} failed ({exc}); Ray's lookup waits")
        return get_node(gcs_address, node_id, *args, **kwargs)

    return polled_first


def _stop_at_once() -> None:
    """Make the coming ``ray.shutdown()`` kill the embedded Ray's processes at once.

    By default it sends SIGTERM and waits up to a second per process, at the end of every run. The
    embedded Ray holds nothing that needs a graceful stop: every result is saved by then.
    A raylet killed at once cannot stop the agents and workers it started, so they are killed too
    (they would otherwise live as long as this process). This reaches into Ray's private node object
    (``ray._private.worker._global_node``); if a Ray release moves it, the graceful stop remains.
    """
    private = _ray_private()
    node = getattr(private[1], "_global_node", None) if private else None
    graceful = getattr(node, "kill_all_processes", None)
    if graceful is None or not isinstance(getattr(node, "all_processes", None), dict):
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


def _descendants(pids: Iterable[int]) -> list[psutil.Process]:
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


__all__ = [
    "EMBEDDED_RAY_ENV",
    "PRIORITY_ENV",
    "EmbeddedRayStart",
    "HOSTED_RAY_ENV",
    "HostedRayConnect",
    "LEAN_ENV",
    "LOOPBACK_ENV",
    "RAY_ADDRESS_ENV",
    "RayHost",
    "final_collection_skipped",
    "hosted_address",
    "lean_from_environment",
    "prepare_environment",
    "skip_final_collection_at_exit",
    "start_embedded_ray",
    "stop_embedded_ray",
]
