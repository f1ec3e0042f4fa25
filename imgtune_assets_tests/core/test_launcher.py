"""core/launcher.py: a run's launching command recognised as gone, and a process that ends with the
process that started it — with real processes."""

import json
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from imgtune_assets.core.launcher import LAUNCHER_TAG, end_with_launcher, launched_by, launcher_gone, launcher_tag


def test_a_running_launcher_is_not_gone_and_an_ended_one_is():
    assert not launcher_gone(launcher_tag())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tag = launcher_tag(child.pid)
        assert not launcher_gone(tag)
    finally:
        child.kill()
        child.wait()
    assert launcher_gone(tag)


def test_a_process_that_took_a_dead_launchers_id_does_not_count_as_it():
    value = json.loads(launcher_tag())
    value["started"] -= 3600  # this pid, but a process started an hour earlier: not this one
    assert launcher_gone(json.dumps(value))


@pytest.mark.parametrize("tag", [None, "", "not json", json.dumps({"pid": "1"}), json.dumps([1, 2])])
def test_without_a_usable_tag_nothing_is_known_gone(tag):
    assert not launcher_gone(tag)
    assert end_with_launcher(tag) is False


def test_on_another_host_a_launcher_is_never_taken_for_gone():
    value = json.loads(launcher_tag())
    value.update(host=socket.gethostname() + "-elsewhere", pid=2**22 + 12345)
    assert not launcher_gone(json.dumps(value))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_process_ends_with_the_command_that_launched_it():
    # launcher (sleeps) -> child: end_with_launcher(launcher's tag), then sleeps on; SIGKILL the launcher
    child_code = textwrap.dedent("""
        import sys, time
        from imgtune_assets.core.launcher import end_with_launcher
        print(end_with_launcher(sys.argv[1]), flush=True)
        time.sleep(60)
    """)
    launcher_code = textwrap.dedent(f"""
        import subprocess, sys, time
        from imgtune_assets.core.launcher import launcher_tag
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}, launcher_tag()])
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


def test_a_re_executed_run_is_not_taken_for_its_parents_launch():
    # The UI's re-execution copies the parent run's tags: the dead command there was not this run's.
    tags = {LAUNCHER_TAG: launcher_tag(), "imgtune/trigger": "cli"}
    assert launched_by(tags) == tags[LAUNCHER_TAG]
    assert launched_by({**tags, "dagster/parent_run_id": "abc"}) is None
    assert launched_by({"imgtune/trigger": "schedule"}) is None
