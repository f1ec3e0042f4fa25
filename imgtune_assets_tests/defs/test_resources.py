"""The embedded Ray of RayResource: loopback only, token authentication on; lean by default, and
started and stopped as Ray ships it when the lean switch is off (``lean_embedded=False`` or
``IMGTUNE_RAY_LEAN=0``)."""

import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from imgtune_assets.core import embedded_ray
from imgtune_assets.defs.resources import LOOPBACK_ENV, RayResource
from imgtune_assets_tests.support.processes import free_port
from imgtune_assets_tests.support.waiting import wait_for


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback on a dual socket
    return (mapped or address).is_loopback


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ray_processes(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its running descendants (a zombie, e.g. another test's process not reaped yet, has
    no command line and runs nothing)."""
    return [root, *(p for p in root.children(recursive=True) if p.is_running() and not _is_zombie(p))]


def test_embedded_ray_listens_on_loopback_only_and_requires_a_token(monkeypatch, tmp_path):
    import ray

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    resource = RayResource(num_cpus=1)
    resource.connect()
    try:
        assert resource.connect_seconds > 0
        listening = []
        for proc in _ray_processes(psutil.Process()):
            try:
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listening += [(proc.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        assert listening, "found no listening Ray sockets"
        assert all(_is_loopback(ip) for _, ip, _ in listening), listening
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:")

        # A client with the wrong token is refused: token authentication is on.
        probe = textwrap.dedent(f"""
            import ray
            try:
                ray.init(address="{gcs}", log_to_driver=False)
            except Exception as exc:
                print("REFUSED", type(exc).__name__, exc)
            else:
                print("ACCEPTED")
        """)
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token-" + "x" * 32,
                   HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
        assert "REFUSED" in out.stdout, out.stdout + out.stderr
        assert "InvalidAuthToken" in out.stderr
        assert "ACCEPTED" not in out.stdout
    finally:
        resource.teardown_after_execution(None)
    assert not ray.is_initialized()


def test_address_comes_from_the_environment_when_unset(monkeypatch):
    monkeypatch.setenv("IMGTUNE_RAY_ADDRESS", "127.0.0.9:6379")
    assert RayResource().resolved_address() == "127.0.0.9:6379"
    assert RayResource(address="127.0.0.8:1").resolved_address() == "127.0.0.8:1"
    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS")
    assert RayResource().resolved_address() is None


def test_embedded_ray_starts_without_dashboard_and_monitors_and_runs_tasks(monkeypatch, caplog):
    import ray
    from ray._private.node import Node

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    monkeypatch.delenv(embedded_ray.LEAN_ENV, raising=False)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    from ray._private import services

    stops_at_once = _record_calls(monkeypatch, "_stop_at_once")
    polled_lookups = _record_calls(monkeypatch, "_after_registration")
    originals = {name: Node.__dict__[name] for name in ("start_api_server", "start_monitor", "start_log_monitor")}
    get_node = services.get_node
    # A process of this test's own, started before Ray: stopping the embedded Ray must leave it alone.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    caplog.set_level(logging.DEBUG, logger=embedded_ray.__name__)
    try:
        resource = RayResource(num_cpus=1)
        resource.connect()
        try:
            # Ray's own start methods are back in place for any later node; only this start skipped them.
            assert {name: Node.__dict__[name] for name in originals} == originals
            # The node's record was looked up after polling for its registration; Ray's lookup is back.
            assert polled_lookups == [True] and services.get_node is get_node
            assert [r.message for r in caplog.records if "registered with GCS (seen on look" in r.message], \
                [r.message for r in caplog.records]
            commands = [" ".join(p.cmdline()) for p in _ray_processes(psutil.Process())[1:]]
            assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands), commands
            for skipped in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "_private/log_monitor.py"):
                assert not any(skipped in c for c in commands), (skipped, commands)
            # The dashboard agent ran through the lean agent script, and did not search for modules.
            agent, searched = _dashboard_agent(commands)
            assert agent.endswith(f"-u {embedded_ray.LEAN_AGENT_SCRIPT} {Path(ray.__file__).parent}/dashboard/agent.py")
            assert not searched

            @ray.remote
            def square(x):
                return x * x

            assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
            # The workers run at this process's priority (Ray's default would make them 15 nicer).
            assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
            children = _ray_processes(psutil.Process())[1:]
            direct = [p for p in children if p.ppid() == os.getpid() and p.pid != bystander.pid]
        finally:
            resource.teardown_after_execution(None)
        assert not ray.is_initialized()
        ray_children = [p for p in children if p.pid != bystander.pid]
        # Ray's processes started by this one (GCS, raylet) are reaped by the stop, not left as its zombies
        # (Ray waits for a process it killed; this checks that the lean stop keeps that)
        assert direct and not [p.pid for p in direct if _is_zombie(p)]
        _, alive = psutil.wait_procs(ray_children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert bystander.poll() is None, "stopping the embedded Ray killed a process that was not Ray's"
    finally:
        bystander.kill()  # also when an assertion failed: later tests count this process's children
        bystander.wait()
    assert stops_at_once == [True]  # the lean stop: every process killed at once
    assert embedded_ray.final_collection_skipped()  # the run's process exits without a last full GC


def _starter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "imgtune-embedded-ray-start"]


def test_a_run_starts_the_embedded_ray_in_the_background_and_connect_waits_for_it(monkeypatch):
    """setup_for_execution (a run that uses the resource begins) starts Ray in a thread; the step's
    connect() waits for it; the head processes outlive the start (they are tied to the starting
    thread, which stays until the teardown); Dagster's SIGTERM handler is left in place."""
    import ray

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    sigterm_before = signal.getsignal(signal.SIGTERM)
    resource = RayResource(num_cpus=1)
    resource.setup_for_execution(None)
    try:
        assert len(_starter_threads()) == 1
        resource.connect()
        assert ray.is_initialized()
        time.sleep(1.0)  # the starting thread's work is done: the node must not go down with it

        @ray.remote
        def square(x):
            return x * x

        assert ray.get([square.remote(i) for i in range(3)], timeout=60) == [0, 1, 4]
        commands = [" ".join(p.cmdline()) for p in _ray_processes(psutil.Process())[1:]]
        assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands), commands
        assert signal.getsignal(signal.SIGTERM) is sigterm_before
        resource.connect()  # connected: a no-op
        children = _ray_processes(psutil.Process())[1:]
    finally:
        resource.teardown_after_execution(None)
    assert not ray.is_initialized()
    assert _starter_threads() == []
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_after_connect_sigterm_reaches_the_process_handler_without_rays_crash_dump(tmp_path):
    """Ray's driver puts its crash handler (a stack dump, then the displaced handler) in front of the
    process's SIGTERM handler; connect() puts the process's own back, so a SIGTERM to a run is only
    Dagster's interruption. In a process of its own: a real background start, then a real SIGTERM."""
    script = tmp_path / "sigterm.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        from imgtune_assets.defs.resources import RayResource

        def handler(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
        resource = RayResource(num_cpus=1)
        resource.setup_for_execution(None)
        try:
            resource.connect()
            try:
                print("connected", flush=True)
                time.sleep(60)
            except KeyboardInterrupt:
                print("interrupted by the process's own handler", flush=True)
        finally:
            resource.teardown_after_execution(None)
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("IMGTUNE_RAY_ADDRESS", embedded_ray.HOSTED_RAY_ENV)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "connected", proc.communicate(timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "interrupted by the process's own handler" in out, (out, err)
    assert "SIGTERM received" not in err, err


def test_a_background_start_that_fails_is_raised_by_connect(monkeypatch):
    import ray

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    resource = RayResource(num_cpus=-1)
    resource.setup_for_execution(None)
    try:
        with pytest.raises(ValueError, match="nonnegative"):
            resource.connect()
        assert not ray.is_initialized()
    finally:
        resource.teardown_after_execution(None)
    assert _starter_threads() == []


def test_a_run_launched_by_the_sweep_command_connects_to_the_commands_ray(tmp_path):
    """``RayHost`` in one process (as ``python -m imgtune_assets.cli sweep`` has it) publishes its Ray's
    address; a run's resource, in another (both fresh processes, as they are), connects to that Ray in
    the background, runs tasks on it and, at its end, only disconnects: the command's Ray lives on
    until the command stops it."""
    file = tmp_path / embedded_ray.HOSTED_RAY_FILE_NAME
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "IMGTUNE_RAY_ADDRESS"}
    env.update(LOOPBACK_ENV)
    host_code = textwrap.dedent(f"""
        import sys
        from imgtune_assets.core.embedded_ray import RayHost
        import json
        host = RayHost({str(tmp_path)!r})
        print(json.dumps(host.env()), flush=True)  # what the sweep command gives its runs
        host.wait()
        print("up", flush=True)
        sys.stdin.readline()
        host.stop()
    """)
    run_code = textwrap.dedent("""
        import json, os, threading
        import ray
        from imgtune_assets.defs.resources import RayResource
        resource = RayResource(num_cpus=1)
        resource.setup_for_execution(None)  # the connection starts at once, and waits for the file
        own_start = any(t.name == "imgtune-embedded-ray-start" for t in threading.enumerate())
        resource.connect()

        @ray.remote
        def parent() -> int:
            return os.getppid()

        parents = sorted(set(ray.get([parent.remote() for _ in range(4)], timeout=60)))
        address = ray.get_runtime_context().gcs_address
        import psutil
        listening = [c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"]
        resource.teardown_after_execution(None)
        print(json.dumps({"own_start": own_start, "parents": parents, "address": address,
                          "connected_after": ray.is_initialized(), "listening": listening}))
    """)
    host = subprocess.Popen([sys.executable, "-c", host_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        run_env = json.loads(host.stdout.readline())
        assert run_env == {embedded_ray.HOSTED_RAY_ENV: str(file), "RAY_AUTH_MODE": "token"}
        run = subprocess.run([sys.executable, "-c", run_code], capture_output=True, text=True, timeout=120,
                             env=dict(env, **run_env))
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert host.stdout.readline().strip() == "up"
        ray_processes = _ray_processes(psutil.Process(host.pid))[1:]
        raylets = {p.pid for p in ray_processes if "raylet" in p.name()}
        assert not seen["own_start"] and not seen["connected_after"]
        assert seen["listening"] and all(_is_loopback(ip) for ip in seen["listening"])  # the run's driver too
        assert raylets and set(seen["parents"]) <= raylets  # the tasks ran on the command's Ray
        assert seen["address"] == embedded_ray.hosted_address(file)
        assert all(p.is_running() for p in ray_processes)  # the run disconnected; it stopped nothing
    finally:
        host.communicate("\n", timeout=60)
    assert host.returncode == 0
    _, alive = psutil.wait_procs(ray_processes, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_a_run_whose_commands_ray_failed_raises_the_commands_error(monkeypatch, tmp_path):
    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    file = tmp_path / embedded_ray.HOSTED_RAY_FILE_NAME
    file.write_text('{"error": "RuntimeError: the raylet died"}')
    monkeypatch.setenv(embedded_ray.HOSTED_RAY_ENV, str(file))
    resource = RayResource()
    resource.setup_for_execution(None)
    try:
        with pytest.raises(RuntimeError, match="imgtune command that launched this run failed to start: "
                                               "RuntimeError: the raylet died"):
            resource.connect()
    finally:
        resource.teardown_after_execution(None)
    # An address set for the run wins over the command's Ray.
    monkeypatch.setenv("IMGTUNE_RAY_ADDRESS", "127.0.0.1:6379")
    assert RayResource().hosted_file() is None


def test_a_run_that_never_connects_still_stops_the_ray_it_started(monkeypatch):
    import ray

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    resource = RayResource(num_cpus=1)
    resource.setup_for_execution(None)
    resource.teardown_after_execution(None)  # waits for the start, then stops it
    assert not ray.is_initialized()
    assert _starter_threads() == []
    _, alive = psutil.wait_procs(_ray_processes(psutil.Process())[1:], timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_resources_initialized_again_after_the_run_start_no_ray(monkeypatch):
    """``dagster job execute`` initializes every resource once more after the run succeeded (to read
    outputs back): no Ray for that. While the run is going, the background start happens."""
    from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, InitResourceContext

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    with DagsterInstance.ephemeral() as instance:
        run = instance.add_run(DagsterRun(job_name="sweep", run_id="finished-run", status=DagsterRunStatus.SUCCESS))
        context = InitResourceContext(resource_config=None, resources=None, resource_def=None, all_resource_defs={},
                                      instance=instance, dagster_run=run)
        resource = RayResource(num_cpus=1)
        resource.setup_for_execution(context)
        assert _starter_threads() == []
        resource.teardown_after_execution(context)

        going = instance.add_run(DagsterRun(job_name="sweep", run_id="running-run", status=DagsterRunStatus.STARTED))
        resource = RayResource(num_cpus=1)
        resource.setup_for_execution(InitResourceContext(resource_config=None, resources=None, resource_def=None,
                                                         all_resource_defs={}, instance=instance, dagster_run=going))
        try:
            assert len(_starter_threads()) == 1
        finally:
            resource.teardown_after_execution(None)
        assert _starter_threads() == []


def test_a_run_of_tuned_images_alone_starts_no_ray_before_a_file_needs_reading(monkeypatch):
    """Applying over an unchanged folder reads nothing: Ray starts only when ``connect()`` is called."""
    from dagster import AssetKey, DagsterInstance, DagsterRun, DagsterRunStatus, InitResourceContext

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    with DagsterInstance.ephemeral() as instance:
        for selection, starts in (({AssetKey(["a", "tuned_images"]), AssetKey(["b", "tuned_images"])}, 0),
                                  ({AssetKey(["a", "tuned_images"]), AssetKey(["a", "sweep_report"])}, 1)):
            run = instance.add_run(DagsterRun(job_name="apply", status=DagsterRunStatus.STARTED,
                                              asset_selection=frozenset(selection)))
            resource = RayResource(num_cpus=1)
            resource.setup_for_execution(InitResourceContext(resource_config=None, resources=None, resource_def=None,
                                                             all_resource_defs={}, instance=instance, dagster_run=run))
            try:
                assert len(_starter_threads()) == starts, selection
            finally:
                resource.teardown_after_execution(None)


def test_a_cluster_address_is_not_connected_to_before_a_step_asks(monkeypatch):
    monkeypatch.setenv("IMGTUNE_RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there: never dialled here
    resource = RayResource()
    resource.setup_for_execution(None)
    assert _starter_threads() == []
    resource.teardown_after_execution(None)


def test_a_cluster_address_where_nothing_listens_fails_soon_naming_it(monkeypatch):
    import ray

    from imgtune_assets.defs.resources import RayConnectError

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    address = f"127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there
    resource = RayResource(address=address)  # the default connect_timeout_seconds
    started = time.monotonic()
    with pytest.raises(RayConnectError) as raised:
        resource.connect()
    # The 10 s probe, then the error: generous for a busy machine, far short of Ray's own retries (minutes).
    assert time.monotonic() - started < 45
    assert address in str(raised.value) and "connection refused" in str(raised.value)
    assert not ray.is_initialized()
    resource.teardown_after_execution(None)

    # a Ray client address: its host:port is probed the same way
    client = f"ray://{address}"
    with pytest.raises(RayConnectError, match=re.escape(client)):
        RayResource(address=client, connect_timeout_seconds=1).connect()


def _record_calls(monkeypatch, name: str) -> list[bool]:
    """Record each call of ``embedded_ray.<name>`` (still calling it)."""
    calls: list[bool] = []
    real = getattr(embedded_ray, name)

    def recording(*args, **kwargs):
        calls.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded_ray, name, recording)
    return calls


def _dashboard_agent(commands: list[str]) -> tuple[str, bool]:
    """(how the raylet among ``commands`` starts its dashboard agent — up to the agent's own arguments —,
    whether that agent searched for dashboard modules, from its log once it has started)."""
    raylets = [c for c in commands if "/raylet/raylet " in c]
    assert len(raylets) == 1, commands
    options = raylets[0].split(" --")
    agent = next(o for o in options if o.startswith("dashboard_agent_command="))
    log = Path(next(o.split("=", 1)[1] for o in options if o.startswith("log_dir="))) / "dashboard_agent.log"
    wait_for(lambda: log.exists() and "Loaded 0 modules" in log.read_text(), timeout=10,
             what=f"the dashboard agent's start in {log}")
    return agent, "Get all modules by type" in log.read_text()


def _head_processes(commands: list[str]) -> list[str]:
    return [skipped for skipped in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "_private/log_monitor.py")
            if any(skipped in c for c in commands)]


@pytest.mark.parametrize("switch", ["field", "environment"])
def test_the_lean_switch_off_starts_and_stops_ray_as_shipped(monkeypatch, switch):
    """``lean_embedded=False`` or ``IMGTUNE_RAY_LEAN=0``: no private-API shortcut, no internal tuning;
    still loopback only, and every Ray process gone after the teardown."""
    import ray
    from ray._private import worker

    monkeypatch.delenv("IMGTUNE_RAY_ADDRESS", raising=False)
    for key in [*embedded_ray.LEAN_TUNING_ENV, *embedded_ray.PRIORITY_ENV]:
        monkeypatch.delenv(key, raising=False)
    if switch == "field":
        monkeypatch.delenv(embedded_ray.LEAN_ENV, raising=False)
        resource = RayResource(num_cpus=1, lean_embedded=False)
    else:
        monkeypatch.setenv(embedded_ray.LEAN_ENV, "0")
        resource = RayResource(num_cpus=1)
    assert not resource.lean()
    if ray.is_initialized():
        ray.shutdown()
    stops_at_once = _record_calls(monkeypatch, "_stop_at_once")
    lean_starts = _record_calls(monkeypatch, "_ray_private")
    resource.connect()
    try:
        assert lean_starts == []  # Ray's private modules were not even imported for the start
        assert not any(key in os.environ for key in embedded_ray.LEAN_TUNING_ENV)
        assert all(os.environ.get(key) == value for key, value in LOOPBACK_ENV.items())
        commands = [" ".join(p.cmdline()) for p in _ray_processes(psutil.Process())[1:]]
        # Ray as shipped starts its monitor, log monitor and dashboard API server.
        assert _head_processes(commands) == ["dashboard/dashboard.py", "autoscaler/_private/monitor.py",
                                             "_private/log_monitor.py"], commands
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert "kill_all_processes" not in vars(worker._global_node)  # Ray's own stop, unwrapped
        agent, searched = _dashboard_agent(commands)  # Ray's agent as shipped: it searched for its modules
        assert embedded_ray.LEAN_AGENT_SCRIPT not in agent and agent.endswith("/dashboard/agent.py") and searched
        assert ray.get(ray.remote(lambda: 7).remote()) == 7
        assert os.environ.get("RAY_worker_niceness") == "0"
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)  # the workers' priority is ours
        children = _ray_processes(psutil.Process())[1:]
    finally:
        resource.teardown_after_execution(None)
    assert not ray.is_initialized()
    assert stops_at_once == []
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]


def test_the_resource_follows_the_lean_switch_unless_its_field_turns_it_off(monkeypatch):
    monkeypatch.delenv(embedded_ray.LEAN_ENV, raising=False)
    assert RayResource().lean() and not RayResource(lean_embedded=False).lean()
    monkeypatch.setenv(embedded_ray.LEAN_ENV, "off")
    assert not RayResource().lean()


def test_every_ray_resource_field_is_described():
    for name, field in RayResource.model_fields.items():
        assert field.description, name


def test_loopback_settings_stay_importable_from_resources():
    from imgtune_assets.defs import resources

    assert resources.LOOPBACK_ENV is embedded_ray.LOOPBACK_ENV
    assert resources.LOOPBACK_ENV == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    assert set(LOOPBACK_ENV) <= set(resources.EMBEDDED_RAY_ENV)
    assert resources.EMBEDDED_RAY_ENV["RAY_worker_niceness"] == "0"


def test_a_refused_client_is_told_the_innermost_reason_and_for_tokens_what_to_set(monkeypatch):
    from imgtune_assets.defs.resources import refused_client_message

    def failed_connect(reason: str) -> ConnectionError:  # as ray.init raises it: the reason two levels down
        try:
            try:
                raise RuntimeError(f"Failed to connect to GCS. Last connection error: Traceback ...\n  File x\n{reason}\n")
            except RuntimeError as inner:
                raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.2:6379") from inner
        except ConnectionError as outer:
            return outer

    auth = "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: token is missing or incorrect."
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    message = refused_client_message("127.0.0.2:6379", failed_connect(auth))
    assert message == f"cannot connect to the Ray cluster at 127.0.0.2:6379: {auth}; export RAY_AUTH_MODE=token, " \
                      "with the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "is not the cluster's" in refused_client_message("127.0.0.2:6379", failed_connect(auth))
    other = refused_client_message("auto", failed_connect("ConnectionError: Could not find any running Ray instance."))
    assert other == "cannot connect to the Ray cluster at auto: ConnectionError: Could not find any running Ray instance."


@pytest.mark.parametrize("server", ["http", "other"])
def test_a_cluster_address_where_another_service_listens_fails_at_once_naming_it(server):
    """Ray's own connect to a port that accepts connections but is no GCS (the dashboard's port pasted
    as the address) retries for ever without a word: the probe asks the server for HTTP/2 first."""
    import socketserver
    import threading

    from imgtune_assets.defs.resources import RayConnectError, probe_address

    class Answer(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(64)
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" if server == "http" else b"-ERR unknown\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Answer) as service:
        threading.Thread(target=service.serve_forever, daemon=True).start()
        address = f"127.0.0.1:{service.server_address[1]}"
        started = time.monotonic()
        with pytest.raises(RayConnectError) as raised:
            probe_address(address, 10)
        service.shutdown()
    assert time.monotonic() - started < 5
    expected = "an HTTP server answers on that port ('HTTP/1.1 400 Bad Request'" if server == "http" else \
        "does not speak gRPC"
    assert f"the Ray cluster at {address} is not there: " in str(raised.value) and expected in str(raised.value)


def test_a_real_gcs_passes_the_probe(local_ray):
    from imgtune_assets.defs.resources import probe_address

    probe_address(local_ray.get_runtime_context().gcs_address, 5)  # raises if it is taken for another service
