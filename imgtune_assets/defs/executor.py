"""``ray_executor``: every Dagster step runs as a Ray **task**, inside a Ray worker process.

The step-delegating pattern (as dagster-k8s and dagster-docker use it): the run process
(``dagster asset materialize``, or the run launched by the daemon) keeps the execution plan and
submits each ready step as a Ray task; the task runs the step exactly as ``dagster api
execute_step`` would, but in the Ray worker process itself (no subprocess, no Ray Job, no
dashboard): it opens the run's instance from the ``instance_ref``, reloads the code from the run's
origin, executes the step and writes its events to the instance. The run process learns outcomes
by tailing the event log, and asks Ray (``ray.wait(ref, timeout=0)``) whether a step's task died
without reporting (a killed worker, a lost node): such a step is failed by the health check. When Ray's
node died under it (one of Ray's infrastructure errors, ``fanout.ray_infrastructure_error``), the
message says so; the trials the step finished are saved, and ``skip_finished`` resumes it.

Ray retries are off for step tasks (``max_retries=0``): Dagster owns retries (``retries`` config,
op ``RetryPolicy``). Terminating the run cancels its step tasks (``ray.cancel(force=True)``), which
also cancels the tasks they submitted.

Where Ray is:
* ``address`` unset and ``$IMGTUNE_RAY_ADDRESS`` unset: the run process starts the same embedded
  local Ray as ``RayResource`` (loopback only, no dashboard; lean unless ``$IMGTUNE_RAY_LEAN=0``, see
  ``imgtune_assets.core.embedded_ray``) and stops it when the run ends.
* ``address`` (or ``$IMGTUNE_RAY_ADDRESS``): an existing cluster; imgtune's package ships to the
  nodes through ``runtime_env`` ``py_modules`` (see ``RayResource``), the nodes need the same Python
  and dependencies. Dagster's instance must be reachable from the nodes: the SQLite instance under
  ``DAGSTER_HOME`` works when every node is on this host; across hosts use Postgres (deploy/README.md).

CPUs: a step task asks for ``num_cpus`` (default 1; per op: tag ``imgtune/ray_num_cpus``). The
experiment step fans its trials out from inside its worker, reusing the worker's connection
(``RayResource.connect`` returns early when ``ray.is_initialized()``); while the step waits on
those tasks (``ray.wait``/``ray.get``) Ray lends its CPU back, so the fan-out can use every CPU of
the cluster, including the one the step holds. Use ``imgtune/ray_num_cpus: "0"`` to let a light
step run without reserving a CPU at all.

Which executor a run uses: ``executor_from_environment()`` (``$IMGTUNE_EXECUTOR``: ``in_process``
(default), ``multiprocess`` or ``ray``).

Private Dagster API: Dagster offers no public way to write a step-delegating executor nor to run one
step in an existing process, so this module imports from ``dagster._*`` — in the one block below (the
package's only other private Dagster imports are defs/storage.py's, for the batched event log). Pinned ``dagster==1.13.27``; imgtune_assets_tests/test_pinned_private_apis.py fails,
saying what to re-check, when the version or any name or signature used here changes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import (
    DagsterEvent,
    DagsterInstance,
    ExecutorDefinition,
    Field,
    IntSource,
    Noneable,
    Permissive,
    StringSource,
    deserialize_value,
    executor,
    in_process_executor,
    multiple_process_executor_requirements,
    multiprocess_executor,
    serialize_value,
)

# --- Dagster's private API: imported here only (pinned dagster==1.13.27; checked name by name and
# signature by signature in imgtune_assets_tests/test_pinned_private_apis.py).
from dagster._cli.api import _execute_step_command_body  # the body of `dagster api execute_step`
from dagster._core.events import EngineEventData  # an engine event's metadata
from dagster._core.execution.retries import RetryMode, get_retries_config  # the executor's `retries` config
from dagster._core.executor.step_delegating import (  # the pattern of dagster-k8s, -docker, -ray
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from dagster._grpc.types import ExecuteStepArgs  # what the executor hands each step
# --- end of Dagster's private API

from imgtune_assets.core.catalog import EXECUTOR_ENV, SWEEP_ENV, SWEEPS_DIR_ENV, SweepCatalogError, served_sweep_files
from imgtune_assets.core.paths import BUNDLED_SWEEPS, OUTPUT_DIR_ENV, default_output_dir

NUM_CPUS_TAG = "imgtune/ray_num_cpus"
# Environment variables that must reach the step's worker (through the task's runtime_env): the
# instance (DAGSTER_HOME; the Postgres instance's connection, read from the environment of every
# process that opens it; Dagster's event batching), and imgtune's own settings.
# The sweep variables (core/catalog.py) and IMGTUNE_OUTPUT_DIR are passed as absolute paths.
PASSTHROUGH_ENV = ("DAGSTER_HOME", "IMGTUNE_EXECUTOR", "IMGTUNE_RAY_LEAN", SWEEP_ENV, SWEEPS_DIR_ENV,
                   OUTPUT_DIR_ENV, "DAGSTER_EVENT_BATCH_SIZE",
                   "DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_DB")
# Secrets a step's worker needs, passed as the task's argument and set only while the step runs: Ray's
# runtime-env agent writes a task's runtime_env, env_vars and all, into its log file on every node.
SECRET_ENV = ("DAGSTER_PG_PASSWORD",)
STEP_WORKER_MESSAGE = "imgtune step worker"


# --------------------------------------------------------------------------- the Ray task


def _worker_identity() -> dict[str, Any]:
    import socket

    import psutil
    import ray

    ctx = ray.get_runtime_context()
    me = psutil.Process()
    parent = me.parent()
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "parent_name": parent.name() if parent else "",
        "process_name": me.name(),
        "hostname": socket.gethostname(),
        "ray_node_id": ctx.get_node_id(),
        "ray_node_ip": ray.util.get_node_ip_address(),
        "ray_worker_id": ctx.get_worker_id(),
        "ray_task_id": ctx.get_task_id() or "",
        "ray_job_id": ctx.get_job_id(),
    }


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` meanwhile; afterwards as before (a reused worker keeps no secret)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute_step_in_ray_worker(serialized_args: str, secrets: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ray task body: what ``dagster api execute_step`` does, in this Ray worker process, with
    ``secrets`` (``SECRET_ENV`` of the run process) in its environment while it runs.

    Returns the worker's identity and whether the step reported an outcome (success, failure,
    up for retry, or a resource init failure); the executor's health check fails a step whose task
    ended without one.
    """
    with _environment(secrets or {}):
        return _execute_step(serialized_args)


def _execute_step(serialized_args: str) -> dict[str, Any]:
    args = deserialize_value(serialized_args, ExecuteStepArgs)
    step_keys = args.step_keys_to_execute or []
    step_key = step_keys[0] if len(step_keys) == 1 else None
    identity = _worker_identity()
    started = time.perf_counter()
    reported = False
    if args.instance_ref is None:
        raise ValueError(f"run {args.run_id}: the step's arguments carry no instance_ref")
    with DagsterInstance.from_ref(args.instance_ref) as instance:
        dagster_run = instance.get_run_by_id(args.run_id)
        if dagster_run is None:
            raise ValueError(f"run {args.run_id} not found")
        instance.report_engine_event(
            f"{STEP_WORKER_MESSAGE}: step {step_key} in Ray worker pid {identity['pid']} "
            f"({identity['process_name']}) on node {identity['ray_node_ip']} {identity['ray_node_id'][:12]}",
            dagster_run,
            EngineEventData(metadata={k: str(v) for k, v in identity.items()}),
            step_key=step_key,
        )
        for event in _execute_step_command_body(args, instance, dagster_run):
            if (event.is_step_success or event.is_step_failure or event.is_step_up_for_retry
                    or event.is_resource_init_failure):
                reported = True
    return {**identity, "reported": reported, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- step handler


def _served_sweep_files(env: dict[str, str]) -> list[Path]:
    """The sweep files the step's code location will read (none if there are none: loading says so)."""
    try:
        return served_sweep_files(env)
    except SweepCatalogError:
        return []


def _env_fingerprint(files: list[Path]) -> str:
    """Content hash of the served sweep files (names and bytes): a changed, added or removed sweep
    gets fresh workers (reused workers keep the definitions, and the trial partitions, they loaded)."""
    digest, read = hashlib.sha256(), False
    for file in files:
        try:
            content = file.read_bytes()
        except OSError:
            continue
        digest.update(str(file).encode() + b"\0" + hashlib.sha256(content).digest())
        read = True
    return digest.hexdigest()[:16] if read else ""


def _absolute(value: str) -> str:
    """A path as the run process means it: ``~`` expanded, relative to the current folder."""
    return str(Path(value.strip()).expanduser().resolve())


def step_env_vars(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a step worker needs, resolved in the run process (so that relative or default
    paths mean what they mean here, not in the worker's working directory).

    ``IMGTUNE_SWEEP`` and ``IMGTUNE_SWEEPS_DIR`` go through as absolute paths when set; with neither
    set, ``IMGTUNE_SWEEPS_DIR`` is the default sweeps folder as this process finds it.
    """
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k, "").strip()}
    for name in (SWEEP_ENV, SWEEPS_DIR_ENV):
        if name in env:
            env[name] = _absolute(env[name])
    if SWEEP_ENV not in env and SWEEPS_DIR_ENV not in env:
        env[SWEEPS_DIR_ENV] = str(Path(BUNDLED_SWEEPS).resolve())
    env[OUTPUT_DIR_ENV] = str(default_output_dir())
    env["IMGTUNE_SWEEP_SHA"] = _env_fingerprint(_served_sweep_files(env))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def step_secrets() -> dict[str, str]:
    """The secrets (``SECRET_ENV``) of this process's environment that a step worker needs."""
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


class RayStepHandler(StepHandler):
    """Launches each step as a Ray task; health = the task's ObjectRef; terminate = ``ray.cancel``."""

    def __init__(self, address: str | None, num_cpus: float, runtime_env: dict[str, Any] | None):
        self._address = address
        self._num_cpus = num_cpus
        self._runtime_env = dict(runtime_env or {})
        self._ray = None  # the RayResource this handler connected with (None: not connected yet)
        self._refs: dict[tuple[str, str], Any] = {}

    @property
    def name(self) -> str:
        return "RayStepHandler"

    # -- connection ---------------------------------------------------------------------------
    def _connect(self, log=None) -> None:
        """Connect as ``RayResource`` does (it sets the loopback switch before Ray's first import)."""
        if self._ray is not None:
            return
        from imgtune_assets.defs.resources import RayResource

        job_env = {k: v for k, v in self._runtime_env.items() if k != "env_vars"} or None
        resource = RayResource(address=self._address, runtime_env=job_env)
        resource.connect(log)  # returns early if this process is already connected
        self._ray = resource

    def close(self) -> None:
        if self._ray is not None:
            self._ray.teardown_after_execution(None)  # shuts Ray down only if it connected here
            self._ray = None

    # -- per step -----------------------------------------------------------------------------
    @staticmethod
    def _step_key(ctx: StepHandlerContext) -> str:
        keys = ctx.execute_step_args.step_keys_to_execute or []
        if len(keys) != 1:
            raise ValueError(f"ray_executor launches one step per Ray task, got steps {keys}")
        return keys[0]

    def _cpus_for(self, ctx: StepHandlerContext, step_key: str) -> float:
        tag = ctx.step_tags.get(step_key, {}).get(NUM_CPUS_TAG)
        if tag is None:
            return self._num_cpus
        try:
            value = float(tag)
        except ValueError:
            raise ValueError(f"op tag {NUM_CPUS_TAG}={tag!r} on step {step_key} is not a number") from None
        if not value >= 0:
            raise ValueError(f"op tag {NUM_CPUS_TAG} on step {step_key} must be >= 0, got {value}")
        return value

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        ctx = step_handler_context
        step_key = self._step_key(ctx)
        step_context = ctx.get_step_context(step_key)
        self._connect(step_context.log)
        import ray
        num_cpus = self._cpus_for(ctx, step_key)
        env_vars = step_env_vars(self._runtime_env.get("env_vars"))
        task = ray.remote(execute_step_in_ray_worker).options(
            name=f"dagster-step:{step_key}",
            num_cpus=num_cpus,
            max_retries=0,  # Dagster owns retries
            retry_exceptions=False,
            runtime_env={"env_vars": env_vars},
        )
        ref = task.remote(serialize_value(ctx.execute_step_args), step_secrets())
        self._refs[(ctx.execute_step_args.run_id, step_key)] = ref
        yield DagsterEvent.step_worker_starting(
            step_context,
            message=f'Launching step "{step_key}" as a Ray task ({num_cpus:g} CPU).',
            metadata={"ray_task_id": ref.task_id().hex(), "num_cpus": float(num_cpus),
                      "launcher_pid": str(os.getpid())},
        )

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        import ray

        ctx = step_handler_context
        step_key = self._step_key(ctx)
        ref = self._refs.get((ctx.execute_step_args.run_id, step_key))
        if ref is None:
            return CheckStepHealthResult.unhealthy(f"no Ray task is known for step {step_key} in this process")
        self._connect()
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return CheckStepHealthResult.healthy()
        try:
            result = ray.get(ref, timeout=0)
        except Exception as exc:  # noqa: BLE001 - any task error is the step's death
            from imgtune_assets.core.fanout import error_line, ray_infrastructure_error

            lost = ray_infrastructure_error(exc)
            if lost is not None:  # e.g. the node died, and the step's worker with it
                return CheckStepHealthResult.unhealthy(f"its Ray task ended without finishing the step: {lost.what}")
            return CheckStepHealthResult.unhealthy(f"its Ray task ended without finishing the step: {error_line(exc)}")
        if not result.get("reported"):
            return CheckStepHealthResult.unhealthy(
                f"its Ray task (worker pid {result.get('pid')}) returned without reporting an outcome")
        return CheckStepHealthResult.healthy()

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        import ray

        ctx = step_handler_context
        step_key = self._step_key(ctx)
        ref = self._refs.get((ctx.execute_step_args.run_id, step_key))
        if ref is None:
            return
        self._connect()
        ray.cancel(ref, force=True, recursive=True)
        yield DagsterEvent.engine_event(
            ctx.get_step_context(step_key),
            f"Cancelled the Ray task of step {step_key} (force: its worker is killed).",
            EngineEventData(metadata={"ray_task_id": ref.task_id().hex()}),
        )


class RayStepDelegatingExecutor(StepDelegatingExecutor):
    """The step-delegating executor, closing the handler's Ray connection when the run's plan ends."""

    def execute(self, plan_context, execution_plan):
        try:
            yield from super().execute(plan_context, execution_plan)
        finally:
            self._step_handler.close()


@executor(
    name="ray",
    config_schema={
        "address": Field(
            Noneable(StringSource), is_required=False, default_value=None,
            description="Ray cluster address ('HOST:PORT', 'auto', 'ray://HOST:10001'). Unset: "
            "$IMGTUNE_RAY_ADDRESS if set, else an embedded local Ray (loopback only) for the run.",
        ),
        "num_cpus": Field(float, is_required=False, default_value=1.0,
                          description=f"CPUs each step task asks for; per op: tag {NUM_CPUS_TAG}."),
        "max_concurrent": Field(Noneable(IntSource), is_required=False, default_value=None,
                                description="Most steps running at once (unset: no limit beyond Ray's CPUs)."),
        "runtime_env": Field(
            Noneable(Permissive()), is_required=False, default_value=None,
            description="Ray runtime_env for the run's connection (e.g. py_modules, working_dir); its "
            "env_vars go to every step task. Unset on a cluster: imgtune's package is shipped (py_modules).",
        ),
        "poll_interval_seconds": Field(float, is_required=False, default_value=0.5,
                                       description="How often the run process reads step events."),
        "health_check_interval_seconds": Field(
            int, is_required=False, default_value=2,
            description="How often the run process asks Ray whether each running step's task is alive."),
        "retries": get_retries_config(),
    },
    requirements=multiple_process_executor_requirements(),
)
def ray_executor(init_context) -> StepDelegatingExecutor:
    """Run each step as a Ray task (in a Ray worker process), on an embedded local Ray or a cluster."""
    config = init_context.executor_config
    num_cpus = float(config["num_cpus"])
    if not num_cpus >= 0:
        raise ValueError(f"ray_executor: num_cpus must be >= 0, got {num_cpus}")
    return RayStepDelegatingExecutor(
        RayStepHandler(address=config.get("address"), num_cpus=num_cpus, runtime_env=config.get("runtime_env")),
        retries=RetryMode.from_config(config["retries"]),
        max_concurrent=config.get("max_concurrent"),
        sleep_seconds=float(config["poll_interval_seconds"]),
        check_step_health_interval_seconds=int(config["health_check_interval_seconds"]),
    )


def executor_from_environment() -> ExecutorDefinition:
    """``$IMGTUNE_EXECUTOR``: unset or ``in_process`` → in_process_executor (default), ``multiprocess`` →
    multiprocess_executor, ``ray`` → ray_executor."""
    name = os.environ.get(EXECUTOR_ENV, "").strip().lower().replace("-", "_")
    if name in ("", "in_process", "inprocess"):
        return in_process_executor
    if name == "multiprocess":
        return multiprocess_executor
    if name == "ray":
        return ray_executor
    raise ValueError(f"{EXECUTOR_ENV}={os.environ[EXECUTOR_ENV]!r}: expected in_process, multiprocess or ray")


def steps_share_the_run_process(executor_def: ExecutorDefinition) -> bool:
    """Whether every step of a run of a job with ``executor_def`` (``context.job_def.executor_def``: the
    executor the definitions set) runs in the run's own process — the in-process executor, the
    default: what one step prepares in memory (e.g. the report's imports) is then there for the next."""
    return executor_def is in_process_executor


__all__ = [
    "NUM_CPUS_TAG",
    "STEP_WORKER_MESSAGE",
    "RayStepHandler",
    "execute_step_in_ray_worker",
    "executor_from_environment",
    "ray_executor",
    "step_env_vars",
    "steps_share_the_run_process",
]
