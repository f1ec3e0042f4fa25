"""Resources: where sweeps write, and the Ray connection."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from imgtune_assets.core import embedded_ray, launcher
# Re-exported: the benchmarks and tests import them from here, beside RayResource.
from imgtune_assets.core.embedded_ray import EMBEDDED_RAY_ENV, LOOPBACK_ENV  # noqa: F401
from imgtune_assets.core.embedded_ray import RAY_ADDRESS_ENV
from imgtune_assets.core.paths import default_output_dir, sweep_output_dir


class SweepResource(ConfigurableResource):
    """Where sweeps write: each sweep under ``<output_dir>/<sweep name>/`` (reports, trial results and
    the stored asset values). The sweep itself is bound to its assets by the sweep factory.

    Every run of a sweep uses it, so its set-up is also where a run is tied to the sweep command that
    launched it (it ends with that command) and where runs of the job left "in progress" by a process
    that is gone are marked failed (``jobs.live_runs_failing_orphans``)."""

    output_dir: str = Field(
        description="Local folder for reports, trial results and stored asset values (one sub-folder per "
        "sweep name). The definitions set it to $IMGTUNE_OUTPUT_DIR, else outputs/ in the project.",
    )

    @classmethod
    def from_environment(cls) -> "SweepResource":
        return cls(output_dir=str(default_output_dir()))

    def setup_for_execution(self, context: Optional[InitResourceContext]) -> None:
        run = context.run if context is not None else None
        if run is None:
            return
        # A run launched by `python -m imgtune_assets.cli sweep` ends with that command (core/launcher.py);
        # and one that an earlier command left running when both were killed is marked failed now.
        tied = launcher.end_with_launcher(launcher.own_tag(run.tags, launcher.LAUNCHER_TAG))
        if context.instance is not None:
            from imgtune_assets.defs.jobs import live_runs_failing_orphans

            if tied:  # this process is the run's: when it is gone, so is the run
                context.instance.add_run_tags(run.run_id, {launcher.RUN_PROCESS_TAG: launcher.process_tag()})
            live_runs_failing_orphans(context.instance, run.job_name, marked_by=f"run {run.run_id}",
                                      log=context.log, besides=run.run_id)

    def sweep_dir(self, sweep_name: str) -> Path:
        if "://" in self.output_dir:
            # Trial results and reports are written with local atomic renames; an object-store URL here
            # would split a sweep's outputs between the store and a local folder named like the URL.
            raise ValueError(f"output_dir {self.output_dir!r}: a local folder is required (object-store URLs "
                             "are not supported for outputs)")
        return sweep_output_dir(Path(self.output_dir), sweep_name)


# A host:port probe of a cluster address: each attempt waits at most this long for an answer, and a
# refused attempt is tried again after a pause (a head that is just starting may refuse for a moment).
PROBE_ATTEMPT_SECONDS = 2.0
PROBE_PAUSE_SECONDS = 0.5
RAY_CLIENT_PREFIX = "ray://"


class RayConnectError(ConnectionError):
    """The Ray cluster at a configured address cannot be reached (nothing accepts a connection there), or
    it would not take this client (e.g. its token authentication)."""


def refused_client_message(address: str, error: BaseException) -> str:
    """Why ``ray.init(address=...)`` failed, for a user: Ray's outer ``ConnectionError`` only says that it
    did; the reason is the last line of the innermost exception's message (e.g. Ray's
    ``AuthenticationError``: a cluster that ``ray start --head`` started uses token authentication by
    default, and this client's environment lacks ``RAY_AUTH_MODE=token`` or the cluster's token)."""
    innermost, seen = error, set()
    while id(innermost) not in seen and (innermost.__cause__ or innermost.__context__) is not None:
        seen.add(id(innermost))
        innermost = innermost.__cause__ or innermost.__context__
    lines = [line.strip() for line in str(innermost).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(innermost).__name__
    hint = ""
    if "auth" in reason.lower():
        hint = ("; export RAY_AUTH_MODE=token, with the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
                if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token"
                else "; RAY_AUTH_MODE=token is set: the token (RAY_AUTH_TOKEN or ~/.ray/auth_token) is not the cluster's")
    return f"cannot connect to the Ray cluster at {address}: {reason}{hint}"


class RayResource(ConfigurableResource):
    """A Ray connection: an embedded local Ray by default, or an existing cluster by ``address``.

    Inside a Ray worker (a step run by ``ray_executor``) the worker's own connection is reused.

    The embedded Ray (no ``address``, no ``$IMGTUNE_RAY_ADDRESS``) is one node on 127.0.0.1 only, with
    no dashboard, started in the background as soon as a run that uses this resource begins (its
    start-up overlaps the steps before the fan-out; a step's ``connect()`` waits for it) and stopped
    when the run ends (``imgtune_assets.core.embedded_ray``). By default it is *lean*: it starts without the dashboard's
    API server, the autoscaler's monitor and the log monitor, with Ray's connect/flush timeouts
    shortened and the raylet's registration polled for, and stops by killing its processes at once
    (figures in benchmarks/RESULTS.md). Three of those shortcuts use Ray's
    private API (pinned ``ray==2.60.0``).
    ``lean_embedded=False``, or ``IMGTUNE_RAY_LEAN=0`` in the environment (which also reaches the
    embedded Ray of ``ray_executor``), turns every shortcut off together: Ray then starts and stops
    exactly as shipped. Either one turning it off wins. A cluster connection is never affected.

    A run launched by ``python -m imgtune_assets.cli sweep`` uses that command's embedded Ray instead
    (``$IMGTUNE_HOSTED_RAY_FILE``, ``embedded_ray.RayHost``): the command starts it as it begins, so
    that its start-up overlaps Dagster's in the run process, and stops it when its runs are done; the
    run connects to it in the background and disconnects at its end. ``num_cpus`` is the command's
    then (its default: every CPU). A cluster address, if set, wins.
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
    object_store_budget_mb: Optional[float] = Field(
        default=None,
        description="MB of decoded images one run may hold in Ray's object store at once; chunks of images "
        "beyond it wait until earlier ones are done (a data set larger than the store streams through "
        "it). Default: half the cluster's object store.",
    )
    connect_timeout_seconds: float = Field(
        default=10.0, gt=0,
        description="Seconds to keep trying to reach a cluster address ('HOST:PORT' or 'ray://HOST:PORT') "
        "before connecting: if nothing there accepts a TCP connection by then, connect() raises "
        "RayConnectError naming the address (Ray itself would retry for many minutes). Ignored for the "
        "embedded Ray and for 'auto'.",
    )
    lean_embedded: bool = Field(
        default=True,
        description="Start and stop the embedded local Ray with imgtune's shortcuts (no dashboard API "
        "server, autoscaler monitor or log monitor; shorter internal timeouts; processes killed at once "
        "at the end), some of which rely on Ray's private API. False (or $IMGTUNE_RAY_LEAN=0): Ray starts "
        "and stops as shipped (a few seconds more per run). Ignored when connecting to a cluster.",
    )

    _started_here: bool = PrivateAttr(default=False)
    _lean_here: bool = PrivateAttr(default=True)
    _connect_seconds: float = PrivateAttr(default=0.0)
    _early_start: Optional[embedded_ray.EmbeddedRayStart | embedded_ray.HostedRayConnect] = PrivateAttr(default=None)
    _early_waited: bool = PrivateAttr(default=False)

    @property
    def connect_seconds(self) -> float:
        """How long ``connect()`` waited for the connection (or for the embedded Ray's start, begun in
        the background when the run began) in this process; 0 if reused."""
        return self._connect_seconds

    def memory_budget_bytes(self) -> Optional[int]:
        """``object_store_budget_mb`` in bytes (None: the fan-out's default, half the object store)."""
        return max(1, int(self.object_store_budget_mb * 1024 * 1024)) if self.object_store_budget_mb else None

    def resolved_address(self) -> Optional[str]:
        return self.address or os.environ.get(RAY_ADDRESS_ENV) or None

    def hosted_file(self) -> Optional[str]:
        """Where the imgtune command that launched this run (``python -m imgtune_assets.cli sweep``)
        writes the address of the embedded Ray it hosts for its runs (``$IMGTUNE_HOSTED_RAY_FILE``);
        None when a cluster address is set or no such command launched the run."""
        return None if self.resolved_address() else (os.environ.get(embedded_ray.HOSTED_RAY_ENV) or None)

    def lean(self) -> bool:
        """Whether the embedded Ray uses the lean shortcuts (``lean_embedded`` and ``$IMGTUNE_RAY_LEAN``)."""
        return self.lean_embedded and embedded_ray.lean_from_environment()

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # The embedded Ray starts in the background as soon as a run that uses it begins: its start-up
        # overlaps the steps before the fan-out (the manifest's hashing, the settings) instead of
        # following them; ``connect()`` waits for it. A cluster is connected to by ``connect()`` only.
        if self.resolved_address() or _ray_initialized() or _run_already_finished(context) or _applies_only(context):
            return
        self._early_start = self._background_start()
        self._started_here = True
        self._lean_here = self.lean()

    def _background_start(self) -> embedded_ray.EmbeddedRayStart | embedded_ray.HostedRayConnect:
        """The embedded Ray's start — or, in a run launched by an imgtune command that hosts one, the
        connection to that command's Ray — begun in a background thread."""
        hosted = self.hosted_file()
        if hosted:
            return embedded_ray.HostedRayConnect(hosted, namespace=self.namespace, runtime_env=self.runtime_env,
                                                 lean=self.lean())
        return embedded_ray.EmbeddedRayStart(num_cpus=self.num_cpus, namespace=self.namespace,
                                             runtime_env=self.runtime_env, lean=self.lean())

    def connect(self, log: Optional[logging.Logger] = None) -> None:
        """Connect to the cluster, or start the embedded local Ray; a no-op when already connected."""
        address = self.resolved_address()
        started = time.perf_counter()  # Ray's start-up includes importing it
        if self._early_start is None and self.hosted_file() and not _ray_initialized():
            # No run began this resource (e.g. it is used on its own): the launching command's Ray is
            # connected to as the run's background start would have been, and waited for below.
            self._early_start, self._started_here, self._lean_here = self._background_start(), True, self.lean()
        if self._early_start is not None and not self._early_waited:
            self._early_waited = True
            try:
                self._early_start.wait()  # the start begun by setup_for_execution
            except BaseException:
                self._started_here = False
                raise
            self._connect_seconds = time.perf_counter() - started
            # A SIGTERM to the run is Dagster's again (an interruption), not preceded by Ray's stack dump.
            self._early_start.restore_sigterm()
            if log:
                self._log_connected(log, address, self._lean_here)
            return
        lean = self.lean()
        if not address:
            # Before the first `import ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported.
            embedded_ray.prepare_environment(lean)
        import ray

        if ray.is_initialized():
            return  # already connected: inside a Ray worker, or the caller connected
        if address:
            # Ray's own connect retries an unreachable GCS for many minutes, saying only that it failed.
            probe_address(address, self.connect_timeout_seconds)
            try:
                ray.init(
                    address=address,
                    namespace=self.namespace,
                    runtime_env=self.runtime_env if self.runtime_env is not None else default_runtime_env(),
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
            except ConnectionError as exc:  # reachable, but it would not take this client
                raise RayConnectError(refused_client_message(address, exc)) from None
        else:
            embedded_ray.start_embedded_ray(num_cpus=self.num_cpus, namespace=self.namespace,
                                            runtime_env=self.runtime_env, lean=lean)
        self._started_here = True
        self._lean_here = lean
        self._connect_seconds = time.perf_counter() - started
        if log:
            self._log_connected(log, address, lean)

    def _log_connected(self, log: logging.Logger, address: Optional[str], lean: bool) -> None:
        import ray

        resources = ray.cluster_resources()
        where = address or ("embedded local, hosted by the imgtune command" if self.hosted_file() else "embedded local")
        log.info(f"Ray connected ({where}{'' if address or lean else ', not lean'}): "
                 f"{int(resources.get('CPU', 0))} CPUs, {sum(1 for n in ray.nodes() if n.get('Alive'))} node(s)")

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        early, self._early_start = self._early_start, None
        if early is not None:
            early.stop()  # (waits for the start to end first)
            if early.error is not None and not self._early_waited and context is not None:
                # Started for a run that never needed it: nothing failed for want of it, but say why.
                context.log.warning(f"the embedded Ray, started in the background, failed to start: {early.error}")
            self._early_waited = False
        elif self._started_here:
            if self.resolved_address():
                import ray

                ray.shutdown()
            else:
                embedded_ray.stop_embedded_ray(lean=self._lean_here)
        if self._started_here:
            self._started_here = False
            embedded_ray.skip_final_collection_at_exit()


def probe_address(address: str, timeout: float) -> None:
    """Raise ``RayConnectError`` naming ``address`` unless its host:port accepts a TCP connection within
    ``timeout`` seconds, by a server that may be Ray's (``_not_grpc``). Addresses that are not a
    host:port (``auto``, ``local``, anything unparsable) are left to Ray."""
    endpoint = _host_port(address)
    if endpoint is None:
        return
    answer: Optional[str] = None
    what = "the Ray client server" if address.startswith(RAY_CLIENT_PREFIX) else "the Ray cluster"
    started = time.monotonic()
    while True:
        remaining = started + timeout - time.monotonic()
        try:
            with socket.create_connection(endpoint, timeout=max(0.05, min(PROBE_ATTEMPT_SECONDS, remaining))) as probe:
                answer = _not_grpc(probe)
            if answer is None:
                return
            break
        except socket.gaierror as exc:
            reason = f"unknown host ({exc.strerror or exc})"
            if exc.errno == socket.EAI_NONAME:  # no such name: it will not resolve a moment later either
                break  # (a temporary failure, EAI_AGAIN, is tried again: a new service's name may be on its way)
        except OSError as exc:
            reason = _unreachable_reason(exc)
        remaining = started + timeout - time.monotonic()
        if remaining <= 0:
            reason += f" for {time.monotonic() - started:.0f} s"
            break
        time.sleep(min(PROBE_PAUSE_SECONDS, remaining))
    if answer is not None:
        raise RayConnectError(f"{what} at {address} is not there: {answer} — use the GCS's address that "
                              "`ray start --head` printed (port 6379 by default), or ray://HOST:10001 for a Ray client")
    raise RayConnectError(f"cannot reach {what} at {address}: {reason} (is `ray start --head` running there?)")


# An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, its
# client server) must answer with a SETTINGS frame of its own.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS_FRAME_TYPE = 0x04


def _not_grpc(connection: socket.socket) -> Optional[str]:
    """What the server on ``connection`` is instead of a gRPC server, when its answer to an HTTP/2
    preface shows it (an HTTP/1 server: the dashboard's port, a web server; any other protocol); None
    when it answers as gRPC does, or not at once (left to Ray), or when Ray is to speak TLS to it.
    Without this, ``ray.init`` waits on such a port for ever, retrying, saying nothing."""
    if os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true"):
        return None
    try:
        connection.settimeout(PROBE_ATTEMPT_SECONDS)
        connection.sendall(_HTTP2_PREFACE)
        answer = connection.recv(64)
    except OSError:
        return None
    if not answer or (len(answer) >= 4 and answer[3] == _SETTINGS_FRAME_TYPE):
        return None
    if answer.startswith(b"HTTP/"):
        status = answer.split(b"\r\n", 1)[0].decode("latin-1")
        return f"an HTTP server answers on that port ({status!r}; the dashboard's, 8265?)"
    return "the server on that port does not speak gRPC, as Ray does"


def _host_port(address: str) -> Optional[tuple[str, int]]:
    """``(host, port)`` of ``HOST:PORT``, ``[IPv6]:PORT`` or ``ray://HOST:PORT``; None for anything else."""
    rest = address.strip()
    if rest.startswith(RAY_CLIENT_PREFIX):
        rest = rest[len(RAY_CLIENT_PREFIX):].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)


def _unreachable_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer"
    return exc.strerror or str(exc) or type(exc).__name__


def _run_already_finished(context: Optional[InitResourceContext]) -> bool:
    """Whether resources are being initialized for a run that has already finished: ``dagster job
    execute`` and ``dagster asset materialize`` initialize every resource once more after the run's
    success, to read outputs back, and no Ray must be started for that."""
    run = getattr(context, "run", None) if context is not None else None
    instance = getattr(context, "instance", None) if context is not None else None
    if run is None or instance is None:
        return False
    stored = instance.get_run_by_id(run.run_id)
    return bool(stored is not None and stored.is_finished)


def _applies_only(context: Optional[InitResourceContext]) -> bool:
    """Whether the run materializes ``tuned_images`` alone: it needs Ray only for files that changed,
    which ``connect()`` starts when there are some (an unchanged folder's re-run starts none)."""
    run = context.run if context is not None else None
    keys = run.asset_selection if run is not None else None
    return bool(keys) and all(key.path[-1] == "tuned_images" for key in keys)


def _ray_initialized() -> bool:
    """Whether this process is connected to Ray (inside a Ray worker, or connected by the caller),
    without importing Ray when it is not loaded."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def default_runtime_env() -> dict[str, Any]:
    """Ship imgtune's own package to cluster workers, so nodes need only the dependencies."""
    import imgtune_assets

    return {"py_modules": [str(Path(imgtune_assets.__file__).parent)],
            "env_vars": {"OMP_NUM_THREADS": "1"}}
