"""The sweep command's run watch (``imgtune_assets.run_watch``): nothing when the command saw its run end;
the kill path is tested through the real command in ``test_cli_end_to_end``."""

import subprocess
import sys
import time

from dagster import DagsterInstance

from imgtune_assets import run_watch


def test_a_watch_told_done_exits_at_once_and_touches_no_instance(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = run_watch.start(tmp_path / "home", "an-invocation", sleeper.pid)
        began = time.monotonic()
        run_watch.finish(watch)
        assert watch.returncode == 0 and time.monotonic() - began < 10
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (tmp_path / "home").exists()  # Dagster's instance never opened


def test_a_watch_whose_command_died_waits_for_the_run_process_then_looks_for_the_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    watch = run_watch.start(home, "an-invocation-with-no-run", sleeper.pid)
    watch.stdin.close()  # as a killed command's end of the pipe closes
    time.sleep(0.5)
    assert watch.poll() is None  # the run process still runs: the watch waits for it
    sleeper.wait()
    assert watch.wait(timeout=60) == 0
    assert (home / "history" / "runs.db").exists()  # it opened the instance to look for the run
    with DagsterInstance.from_config(str(home)) as instance:  # it looked, found no such run, marked nothing
        assert instance.get_runs() == []
