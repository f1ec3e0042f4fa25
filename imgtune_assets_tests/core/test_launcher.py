"""core/launcher.py: a run process recognised as gone, and a process that ends with the process that
launched it — with real processes (Linux: elsewhere the module does nothing)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from imgtune_assets.core.launcher import (
    LAUNCHER_PID_ENV,
    LAUNCHER_TAG,
    end_with_launcher,
    own_tag,
    process_gone,
    process_tag,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and prctl")


def sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def test_a_running_process_is_not_gone_and_an_ended_one_is():
    assert not process_gone(process_tag())
    child = sleeper()
    try:
        tag = process_tag(child.pid)
        assert not process_gone(tag)
    finally:
        child.kill()
        child.wait()
    assert process_gone(tag)


def test_a_process_given_a_gone_ones_id_is_not_taken_for_it():
    value = json.loads(process_tag())
    value["start"] -= 1000  # this pid, but a process started earlier: not this one
    assert process_gone(json.dumps(value))


def test_a_reboot_since_means_gone_and_another_machine_or_pid_namespace_means_unknown():
    value = json.loads(process_tag())
    assert process_gone(json.dumps({**value, "boot": "another-boot"}))
    assert not process_gone(json.dumps({**value, "host": socket.gethostname() + "-elsewhere", "start": -1}))
    assert not process_gone(json.dumps({**value, "pidns": -1, "start": -1}))  # a container sharing the name


@pytest.mark.parametrize("tag", [None, "", "not json", json.dumps({"pid": "1"}), json.dumps([1, 2])])
def test_without_a_usable_tag_nothing_is_known_gone_or_tied(tag):
    assert not process_gone(tag)
    assert end_with_launcher(tag, {LAUNCHER_PID_ENV: "1"}) is False


def test_a_re_executed_runs_copied_tags_are_not_its_own():
    # The UI's re-execution copies the parent run's tags: the processes named there were the parent's.
    tags = {LAUNCHER_TAG: process_tag(), "imgtune/trigger": "cli"}
    assert own_tag(tags, LAUNCHER_TAG) == tags[LAUNCHER_TAG]
    assert own_tag({**tags, "dagster/parent_run_id": "abc"}, LAUNCHER_TAG) is None
    assert own_tag({"imgtune/trigger": "schedule"}, LAUNCHER_TAG) is None


def test_only_the_process_the_launcher_started_and_told_is_tied():
    # this process (a launcher) -> child: not told / told another pid / told -> grandchild, told by the
    # environment it inherited (a step process): only the told child is tied
    grandchild = textwrap.dedent("""
        import sys
        from imgtune_assets.core.launcher import end_with_launcher
        print("grandchild", end_with_launcher(sys.argv[1]), flush=True)
    """)
    child = textwrap.dedent(f"""
        import os, subprocess, sys
        from imgtune_assets.core.launcher import LAUNCHER_PID_ENV, end_with_launcher
        tag = sys.argv[1]
        print("not told", end_with_launcher(tag, {{}}), flush=True)
        print("told another", end_with_launcher(tag, {{LAUNCHER_PID_ENV: str(os.getppid() + 1)}}), flush=True)
        subprocess.run([sys.executable, "-c", {grandchild!r}, tag], check=True)
        print("told", end_with_launcher(tag), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", child, process_tag()], capture_output=True, text=True, timeout=60,
                            env={**os.environ, LAUNCHER_PID_ENV: str(os.getpid())})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["not told False", "told another False", "grandchild False", "told True"]


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_process_ends_with_the_command_that_launched_it(sigint):
    # launcher (sleeps) -> child: end_with_launcher(launcher's tag), then sleeps on; SIGKILL the launcher.
    # The child handles SIGINT as Dagster's run does, or ignores it, as a process a shell started in
    # the background does.
    handler = "signal.default_int_handler" if sigint == "handled" else "signal.SIG_IGN"
    child_code = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, {handler})
        from imgtune_assets.core.launcher import end_with_launcher
        print(end_with_launcher(sys.argv[1]), flush=True)
        time.sleep(60)
    """)
    launcher_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from imgtune_assets.core.launcher import LAUNCHER_PID_ENV, process_tag
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}, process_tag()],
                                 env={{**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}})
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = psutil.Process(int(launcher.stdout.readline()))
        assert launcher.stdout.readline().strip() == "True"  # the child (sharing the launcher's stdout) is tied
        assert psutil.wait_procs([child], timeout=1)[1] == [child]  # and lives on while its launcher does
        launcher.kill()
        launcher.wait()
        _, alive = psutil.wait_procs([child], timeout=20)  # (not our child: its exit status is init's)
        assert not alive, "the child outlived its launcher"
    finally:
        launcher.kill()
        if child is not None and child.is_running():
            child.kill()
