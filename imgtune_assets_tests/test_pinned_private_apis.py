"""The private Dagster and Ray APIs imgtune relies on, pinned to ``dagster==1.13.27`` and ``ray==2.60.0``.

Where public APIs fall short, imgtune reaches into private ones, each imported in one place:

* ``imgtune_assets/defs/executor.py``: the step-delegating executor classes (``ray_executor``) and the
  body of ``dagster api execute_step`` (run in a Ray worker);
* ``imgtune_assets/defs/storage.py``: Dagster's SQLite storages, subclassed to write event batches;
* ``imgtune_assets/core/embedded_ray.py`` (``_ray_private``): Ray's ``Node``, ``_global_node``,
  ``services.get_node``, ``ray._raylet.GcsClient`` and the dashboard agent's command line and module
  search (``ray_lean_agent.py``), for the lean start and the at-once stop of the embedded Ray; and
  (``spilled_bytes_total``) ``ray._private.internal_api``'s global memory info, for the bytes a run's
  cluster spilled.

This module fails, saying what to re-check, when a pinned version changes or when a name, method or
signature used there is gone or changed. After an upgrade: read the upstream changes for the listed
names, adapt the module named in the failure, run the whole test suite (test_resources.py,
test_storage.py and test_executor.py exercise these paths), then update the pins here and in
pyproject.toml.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PINNED_DAGSTER = "1.13.27"
PINNED_RAY = "2.60.0"
PACKAGE = Path(__file__).resolve().parents[1] / "imgtune_assets"

EXECUTOR = "imgtune_assets/defs/executor.py (ray_executor: step-delegating executor, step worker body)"
STORAGE = "imgtune_assets/defs/storage.py (BatchedSqliteEventLogStorage, BatchedSqliteStorage, ImgtuneInstance)"
EMBEDDED = ("imgtune_assets/core/embedded_ray.py (lean start: _lean_head_node, _after_registration, "
            "_lean_agent_command and ray_lean_agent.py; at-once stop: _stop_at_once)")


def _recheck(where: str, what: str) -> str:
    message = (f"PINNED PRIVATE API CHANGED: {what}. Re-check {where} against the installed release, then "
               f"update the pins in this test and pyproject.toml.")
    if where == EMBEDDED:
        message += " Until then IMGTUNE_RAY_LEAN=0 starts and stops the embedded Ray as shipped."
    return message


def _params(func) -> list[str]:
    return [name for name in inspect.signature(func).parameters if name not in ("self", "cls")]


def _has_params(func, expected: list[str], where: str, label: str) -> None:
    found = _params(func)
    assert found[:len(expected)] == expected, _recheck(where, f"{label} takes {found}, imgtune relies on {expected}")


def _source(obj) -> str:
    return inspect.getsource(obj)


# --------------------------------------------------------------------------- versions


def test_dagster_is_the_pinned_version():
    import dagster

    assert dagster.__version__ == PINNED_DAGSTER, _recheck(
        f"{EXECUTOR} and {STORAGE}",
        f"dagster is {dagster.__version__}, imgtune's private Dagster API use is checked against {PINNED_DAGSTER}")


def test_ray_is_the_pinned_version():
    import ray

    assert ray.__version__ == PINNED_RAY, _recheck(
        EMBEDDED, f"ray is {ray.__version__}, imgtune's private Ray API use is checked against {PINNED_RAY}")


# --------------------------------------------------------------------------- Ray (core/embedded_ray.py)


def test_ray_private_modules_are_where_embedded_ray_imports_them():
    from imgtune_assets.core import embedded_ray

    private = embedded_ray._ray_private()
    assert private is not None, _recheck(EMBEDDED, "ray._private.node.Node or ray._private.worker cannot be imported")
    _, worker, _, _, _ = private
    assert hasattr(worker, "_global_node"), _recheck(EMBEDDED, "ray._private.worker._global_node is gone")


def test_ray_node_lookup_that_the_lean_start_polls_before():
    from ray._private import services
    from ray._private.node import Node
    from ray._raylet import GcsClient, InnerGcsClient

    _has_params(services.get_node, ["gcs_address", "node_id"], EMBEDDED, "ray._private.services.get_node")
    # The head node's start looks its record up through the module attribute that the lean start wraps.
    assert "ray._private.services.get_node(" in _source(Node.__init__), _recheck(
        EMBEDDED, "Node.__init__ no longer calls ray._private.services.get_node")
    # (Cython: no signatures to inspect.) Ray builds its own client the way the lean start does...
    assert "GcsClient(address=" in _source(services), _recheck(
        EMBEDDED, "ray._private.services no longer builds ray._raylet.GcsClient(address=...)")
    assert GcsClient.__doc__ and "InnerGcsClient" in GcsClient.__doc__, _recheck(
        EMBEDDED, "ray._raylet.GcsClient no longer wraps InnerGcsClient")
    # ...and reads the node table with a timeout, keyed by NodeID (which has .hex()).
    doc = InnerGcsClient.get_all_node_info.__doc__ or ""
    assert doc.startswith("InnerGcsClient.get_all_node_info(self, timeout") and "Dict[NodeID" in doc, _recheck(
        EMBEDDED, f"ray._raylet's GCS client get_all_node_info changed: {doc.splitlines()[:1]}")


def test_ray_node_start_methods_skipped_by_the_lean_start():
    from ray._private.node import Node

    from imgtune_assets.core.embedded_ray import SKIPPED_HEAD_PROCESSES

    for name in SKIPPED_HEAD_PROCESSES:
        assert inspect.isfunction(Node.__dict__.get(name)), _recheck(
            EMBEDDED, f"ray._private.node.Node.{name} is gone (the embedded Ray would start it again)")
    # The lean start works only because Ray's node start calls these methods by name.
    head = _source(Node.start_head_processes)
    assert "self.start_monitor(" in head and "self.start_api_server(" in head, _recheck(
        EMBEDDED, "Node.start_head_processes no longer calls self.start_monitor / self.start_api_server")
    assert "self.start_log_monitor(" in _source(Node.start_ray_processes), _recheck(
        EMBEDDED, "Node.start_ray_processes no longer calls self.start_log_monitor")
    _has_params(Node.start_api_server, ["include_dashboard", "raise_on_failure"], EMBEDDED, "Node.start_api_server")


def test_ray_dashboard_agent_that_the_lean_agent_runs():
    from ray._private import ray_constants, services
    from ray._private.utils import get_dashboard_dependency_error
    from ray.dashboard import utils as dashboard_utils
    from ray.dashboard.agent import DashboardAgent

    # The raylet's agent command line starts with the Python command built for the agent's process type,
    # followed by the path of Ray's agent script (which ray_lean_agent.py runs in its place).
    _has_params(services._build_python_executable_command_memory_profileable, ["component", "session_dir"],
                EMBEDDED, "ray._private.services._build_python_executable_command_memory_profileable")
    raylet = _source(services.start_raylet)
    assert ("_build_python_executable_command_memory_profileable(\n            "
            "ray_constants.PROCESS_TYPE_DASHBOARD_AGENT") in raylet \
        and 'os.path.join(RAY_PATH, "dashboard", "agent.py")' in raylet, _recheck(
        EMBEDDED, "services.start_raylet builds the dashboard agent's command line differently")
    from imgtune_assets.core.embedded_ray import DASHBOARD_AGENT_PROCESS_TYPE

    assert ray_constants.PROCESS_TYPE_DASHBOARD_AGENT == DASHBOARD_AGENT_PROCESS_TYPE, _recheck(
        EMBEDDED, f"Ray names the agent's process type {ray_constants.PROCESS_TYPE_DASHBOARD_AGENT!r}")
    # The agent finds its modules through the function the lean agent replaces, by module attribute...
    assert "dashboard_utils.get_all_modules(" in _source(DashboardAgent._load_modules), _recheck(
        EMBEDDED, "DashboardAgent._load_modules no longer calls dashboard_utils.get_all_modules")
    # ...and, in this (minimal) install, that search finds none: skipping it changes nothing.
    assert get_dashboard_dependency_error() is not None, _recheck(
        EMBEDDED, "Ray's dashboard dependencies are installed (ray[default]); the lean agent then searches as shipped")
    assert dashboard_utils.get_all_modules(dashboard_utils.DashboardAgentModule) == [], _recheck(
        EMBEDDED, "the minimal install's dashboard agent now loads modules; the lean agent would skip them")


def test_ray_node_stop_used_by_the_at_once_stop():
    from ray._private import services, worker
    from ray._private.node import Node

    _has_params(Node.kill_all_processes, ["check_alive", "allow_graceful", "wait"], EMBEDDED,
                "Node.kill_all_processes")
    assert "self.all_processes" in _source(Node.__init__), _recheck(
        EMBEDDED, "Node no longer keeps its processes in self.all_processes")
    assert "process" in services.ProcessInfo._fields, _recheck(
        EMBEDDED, "ray._private.services.ProcessInfo has no .process (the Popen of each Ray process)")
    # ray.shutdown() stops the node through the method the at-once stop wraps, with keywords.
    shutdown = _source(worker.shutdown)
    assert "_global_node.kill_all_processes(" in shutdown, _recheck(
        EMBEDDED, "ray.shutdown no longer calls _global_node.kill_all_processes")
    for keyword in ("check_alive=", "allow_graceful=", "wait="):
        assert keyword in shutdown, _recheck(
            EMBEDDED, f"ray.shutdown calls kill_all_processes without {keyword}")


def test_ray_memory_info_that_the_spill_report_reads():
    from ray._private import internal_api
    from ray.core.generated import node_manager_pb2

    _has_params(internal_api.get_memory_info_reply, ["state", "node_manager_address", "node_manager_port",
                                                     "timeout_seconds"], EMBEDDED,
                "ray._private.internal_api.get_memory_info_reply")
    _has_params(internal_api.get_state_from_address, ["address"], EMBEDDED,
                "ray._private.internal_api.get_state_from_address")
    fields = node_manager_pb2.FormatGlobalMemoryInfoReply.DESCRIPTOR.fields_by_name["store_stats"].message_type
    assert "spilled_bytes_total" in fields.fields_by_name, _recheck(
        EMBEDDED, "Ray's store stats no longer carry spilled_bytes_total")


# --------------------------------------------------------------------------- Dagster (defs/executor.py)


@pytest.mark.parametrize("logger, notice", [("RAY_AUTH_LOGGER", "RAY_AUTH_NOTICE"),
                                            ("RAY_WORKER_LOGGER", "RAY_SIGTERM_NOTICE")])
def test_ray_notices_that_the_embedded_ray_drops_are_logged_where_it_listens(logger, notice):
    """The embedded Ray filters two of Ray's notices by logger and message: a moved logger or a reworded
    message would let them through again, on every start."""
    import importlib

    from imgtune_assets.core import embedded_ray

    name, text = getattr(embedded_ray, logger), getattr(embedded_ray, notice)
    module = importlib.import_module(name)
    assert getattr(module, "logger", None) is not None and module.logger.name == name, _recheck(
        EMBEDDED, f"{name} no longer logs through logging.getLogger(__name__)")
    assert f'"{text}' in _source(module), _recheck(EMBEDDED, f"{name} no longer logs a message that begins {text!r}")


def test_dagster_tags_spelled_out_in_imgtune_are_dagsters():
    from dagster._core.storage import tags

    from imgtune_assets.core import launcher
    from imgtune_assets.defs import jobs

    assert launcher.PARENT_RUN_ID_TAG == tags.PARENT_RUN_ID_TAG
    assert jobs.ASSET_PARTITION_RANGE_START_TAG == tags.ASSET_PARTITION_RANGE_START_TAG
    assert jobs.ASSET_PARTITION_RANGE_END_TAG == tags.ASSET_PARTITION_RANGE_END_TAG


def test_step_delegating_executor_classes_and_what_ray_executor_overrides():
    from dagster._core.executor.step_delegating import (
        CheckStepHealthResult,
        StepDelegatingExecutor,
        StepHandler,
        StepHandlerContext,
    )

    from imgtune_assets.defs.executor import RayStepDelegatingExecutor, RayStepHandler

    # Every abstract method of StepHandler is one RayStepHandler implements: a new one would leave
    # RayStepHandler abstract (and ray_executor unusable).
    assert set(StepHandler.__abstractmethods__) == {"name", "launch_step", "check_step_health", "terminate_step"}, \
        _recheck(EXECUTOR, f"StepHandler's abstract methods are now {sorted(StepHandler.__abstractmethods__)}")
    assert not RayStepHandler.__abstractmethods__, _recheck(
        EXECUTOR, f"RayStepHandler misses {sorted(RayStepHandler.__abstractmethods__)}")
    for method in ("launch_step", "check_step_health", "terminate_step"):
        _has_params(getattr(StepHandler, method), ["step_handler_context"], EXECUTOR, f"StepHandler.{method}")

    _has_params(StepDelegatingExecutor.__init__, ["step_handler", "retries", "sleep_seconds",
                                                  "check_step_health_interval_seconds", "max_concurrent"],
                EXECUTOR, "StepDelegatingExecutor.__init__")
    _has_params(StepDelegatingExecutor.execute, ["plan_context", "execution_plan"], EXECUTOR,
                "StepDelegatingExecutor.execute")
    assert inspect.isgeneratorfunction(StepDelegatingExecutor.execute), _recheck(
        EXECUTOR, "StepDelegatingExecutor.execute is no longer a generator (RayStepDelegatingExecutor yields from it)")
    assert "self._step_handler = step_handler" in _source(StepDelegatingExecutor.__init__), _recheck(
        EXECUTOR, "StepDelegatingExecutor no longer keeps its handler in self._step_handler "
        "(RayStepDelegatingExecutor.execute closes it)")
    assert issubclass(RayStepDelegatingExecutor, StepDelegatingExecutor)

    for name in ("execute_step_args", "step_tags"):
        assert isinstance(getattr(StepHandlerContext, name, None), property), _recheck(
            EXECUTOR, f"StepHandlerContext.{name} is gone")
    _has_params(StepHandlerContext.get_step_context, ["step_key"], EXECUTOR, "StepHandlerContext.get_step_context")
    assert CheckStepHealthResult.healthy().is_healthy
    unhealthy = CheckStepHealthResult.unhealthy("why")
    assert not unhealthy.is_healthy and unhealthy.unhealthy_reason == "why", _recheck(
        EXECUTOR, "CheckStepHealthResult.healthy/unhealthy changed")


def test_step_worker_body_and_its_arguments():
    from dagster import DagsterInstance
    from dagster._cli.api import _execute_step_command_body
    from dagster._grpc.types import ExecuteStepArgs

    _has_params(_execute_step_command_body, ["args", "instance", "dagster_run"], EXECUTOR,
                "dagster._cli.api._execute_step_command_body (the body of `dagster api execute_step`)")
    assert inspect.isgeneratorfunction(_execute_step_command_body), _recheck(
        EXECUTOR, "_execute_step_command_body no longer yields the step's events")
    for field in ("run_id", "step_keys_to_execute", "instance_ref"):
        assert field in ExecuteStepArgs._fields, _recheck(EXECUTOR, f"ExecuteStepArgs has no {field}")
    _has_params(DagsterInstance.report_engine_event, ["message", "dagster_run", "engine_event_data"], EXECUTOR,
                "DagsterInstance.report_engine_event")
    assert "step_key" in _params(DagsterInstance.report_engine_event), _recheck(
        EXECUTOR, "DagsterInstance.report_engine_event takes no step_key")


def test_events_retries_and_serialization_used_by_the_executor():
    from dagster import DagsterEvent, Field, deserialize_value, serialize_value
    from dagster._core.events import EngineEventData
    from dagster._core.execution.retries import RetryMode, get_retries_config

    assert "metadata" in _params(EngineEventData), _recheck(EXECUTOR, "EngineEventData takes no metadata")
    _has_params(DagsterEvent.step_worker_starting, ["step_context", "message", "metadata"], EXECUTOR,
                "DagsterEvent.step_worker_starting")
    _has_params(DagsterEvent.engine_event, ["plan_context", "message", "event_specific_data"], EXECUTOR,
                "DagsterEvent.engine_event")
    for name in ("is_step_success", "is_step_failure", "is_step_up_for_retry", "is_resource_init_failure"):
        assert isinstance(getattr(DagsterEvent, name, None), property), _recheck(
            EXECUTOR, f"DagsterEvent.{name} is gone (the step worker reports whether the step ended)")
    assert isinstance(get_retries_config(), Field), _recheck(EXECUTOR, "get_retries_config() is no config Field")
    assert RetryMode.from_config({"enabled": {}}) == RetryMode.ENABLED, _recheck(
        EXECUTOR, "RetryMode.from_config changed")
    args = EngineEventData(metadata={"a": "b"})
    assert deserialize_value(serialize_value(args), EngineEventData) == args


# --------------------------------------------------------------------------- Dagster (defs/storage.py)


def test_sqlite_event_log_internals_used_by_the_batched_storage():
    from dagster import DagsterEventType, EventLogEntry
    from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
    from dagster._core.events.log import EventLogEntry as PrivateEventLogEntry
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
    from dagster._core.storage.sqlalchemy_compat import db_result

    assert EventLogEntry is PrivateEventLogEntry
    assert DagsterEventType.ASSET_MATERIALIZATION in ASSET_EVENTS, _recheck(STORAGE, "ASSET_EVENTS changed")
    assert DagsterEventType.ASSET_MATERIALIZATION_PLANNED in ASSET_EVENTS, _recheck(STORAGE, "ASSET_EVENTS changed")
    assert DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED in ASSET_CHECK_EVENTS, _recheck(
        STORAGE, "ASSET_CHECK_EVENTS changed")
    expected = {
        "__init__": ["base_dir", "inst_data"],
        "store_event": ["event"],
        "store_event_batch": ["events"],
        "prepare_insert_event": ["event"],
        "run_connection": ["run_id"],
        "index_transaction": [],
        "index_connection": [],
        "_store_asset_event_tags": ["conn", "events", "event_ids"],
        "_store_asset_event": ["conn", "event", "event_id"],
        "store_asset_check_event": ["event", "event_id"],
        "from_config_value": ["inst_data", "config_value"],
    }
    for name, params in expected.items():
        method = getattr(SqliteEventLogStorage, name, None)
        assert method is not None, _recheck(STORAGE, f"SqliteEventLogStorage.{name} is gone")
        _has_params(method, params, STORAGE, f"SqliteEventLogStorage.{name}")
    _has_params(db_result, ["conn", "query"], STORAGE, "dagster._core.storage.sqlalchemy_compat.db_result")


def test_sqlite_storage_and_instance_ref_used_by_the_instance_class():
    from dagster._core.instance.ref import InstanceRef, _event_logs_directory
    from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
    from dagster._serdes import ConfigurableClassData

    _has_params(DagsterSqliteStorage.__init__, ["base_dir", "inst_data"], STORAGE, "DagsterSqliteStorage.__init__")
    _has_params(DagsterSqliteStorage.from_local, ["base_dir", "inst_data"], STORAGE, "DagsterSqliteStorage.from_local")
    assert "self._event_log_storage" in _source(DagsterSqliteStorage), _recheck(
        STORAGE, "DagsterSqliteStorage no longer keeps its event log in self._event_log_storage")
    assert "_event_log_storage" in _source(DagsterSqliteStorage.event_log_storage.fget), _recheck(
        STORAGE, "DagsterSqliteStorage.event_log_storage no longer returns self._event_log_storage")
    _has_params(_event_logs_directory, ["base"], STORAGE, "dagster._core.instance.ref._event_logs_directory")
    defaults = InstanceRef.config_defaults("/nonexistent")
    assert {"storage", "event_log_storage"} <= set(defaults), _recheck(
        STORAGE, f"InstanceRef.config_defaults has keys {sorted(defaults)}")
    assert ConfigurableClassData._fields == ("module_name", "class_name", "config_yaml"), _recheck(
        STORAGE, "ConfigurableClassData's fields changed")
    # An instance_class's own defaults and schema are asked for by name (duck typing, no base method).
    from_config = _source(InstanceRef.from_dir)
    assert "custom_instance_class.config_defaults(base_dir)" in from_config, _recheck(
        STORAGE, "InstanceRef.from_dir no longer asks the instance_class for config_defaults(base_dir)")
    assert "custom_instance_class.config_schema()" in from_config, _recheck(
        STORAGE, "InstanceRef.from_dir no longer asks the instance_class for config_schema()")


# --------------------------------------------------------------------------- one place each


# Private imports that live elsewhere in the package, each known here: (file, module).
ELSEWHERE: set[tuple[str, str]] = set()
ALLOWED_FILES = {
    "defs/executor.py": "dagster._",
    "defs/storage.py": "dagster._",
    "core/embedded_ray.py": ("ray._private", "ray._raylet"),
    "core/ray_lean_agent.py": ("ray._private",),  # the agent process's own script, run by the raylet
}


def _private_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module in ("dagster", "ray")]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for module in modules:
            if module.startswith(("dagster._", "ray._")):
                found.append((node.lineno, module))
    return found


def test_private_apis_are_imported_in_one_place_each():
    """A private import outside the modules above would escape this test's checks."""
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, module in _private_imports(path):
            prefix = ALLOWED_FILES.get(rel)
            if (prefix and module.startswith(prefix)) or (rel, module) in ELSEWHERE:
                continue
            stray.append(f"imgtune_assets/{rel}:{line} imports {module}")
    assert not stray, ("Private Dagster/Ray API imported outside its one place (defs/executor.py, "
                       "defs/storage.py, core/embedded_ray.py, core/ray_lean_agent.py): use a public API, or "
                       "move it there and add "
                       "its names to this test:\n" + "\n".join(stray))


# The tests' own private imports: Dagster's test utilities and internals that only a test needs (to make
# a run record, read a tag, serve a code location over gRPC). Each is known here, so that a new one is a
# decision; they fail as imports when Dagster moves them, after test_dagster_is_the_pinned_version.
TESTS = PACKAGE.parent / "imgtune_assets_tests"
TEST_IMPORTS = {
    ("defs/test_jobs.py", "dagster._core.test_utils"),  # create_run_for_test: runs in any status
    ("defs/test_schedules.py", "dagster._core.test_utils"),
    ("defs/test_sensors.py", "dagster._core.test_utils"),
    ("defs/test_storage.py", "dagster._core.instance.ref"),
    ("defs/test_storage.py", "dagster._core.storage.tags"),
    ("defs/test_executor.py", "dagster._core.workspace.context"),
    ("defs/test_executor.py", "dagster._core.workspace.load_target"),
    ("defs/test_executor.py", "dagster._grpc.client"),
    ("defs/test_resources.py", "ray._private"),  # the lean start's effects, seen on Ray's own node
    ("defs/test_resources.py", "ray._private.node"),
    ("test_cli_end_to_end.py", "dagster._utils.error"),
}


def test_the_tests_private_imports_are_known():
    found = {(path.relative_to(TESTS).as_posix(), module) for path in sorted(TESTS.rglob("*.py"))
             if path.name != Path(__file__).name for _, module in _private_imports(path)}
    assert found == TEST_IMPORTS, (f"new: {sorted(found - TEST_IMPORTS)}; gone: {sorted(TEST_IMPORTS - found)} "
                                   "(use a public API, or list it in TEST_IMPORTS)")


def test_ray_private_modules_are_imported_in_one_function():
    source = (PACKAGE / "core" / "embedded_ray.py").read_text()
    tree = ast.parse(source)
    owners = set()
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("ray._private", "ray._raylet")):
                    owners.add(func.name)
    assert owners == {"_ray_private"}, owners


@pytest.mark.parametrize("module", ["imgtune_assets.defs.executor", "imgtune_assets.defs.storage"])
def test_modules_with_private_dagster_imports_load(module):
    import importlib

    importlib.import_module(module)
