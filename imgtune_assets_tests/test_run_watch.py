"""The sweep command's run watch (``imgtune_assets.run_watch``) against a real Dagster instance on disk,
with a sleeping process for the run's; the command killed under a real run is tested through the real
command in ``test_cli_end_to_end``."""

import subprocess
import sys
import time
import uuid

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from imgtune_assets import run_watch
from imgtune_assets.cli import INVOCATION_TAG


def sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_watch_told_the_run_ended_exits_at_once_and_touches_no_instance(tmp_path):
    run = sleeper(300)
    try:
        watch = run_watch.start(tmp_path / "home", "an-invocation", run.pid, log=tmp_path / "sweep.log")
        began = time.monotonic()
        run_watch.finish(watch, run_ended=True)  # (waits up to 10 s for the watch: it may still be starting)
        assert watch.wait(timeout=120) == 0
        # At once: not once the run process ends (it sleeps for minutes); generous for a busy machine.
        assert time.monotonic() - began < 60
    finally:
        run.kill()
        run.wait()
    assert not (tmp_path / "home").exists()  # Dagster's instance never opened


def test_a_watch_whose_command_died_waits_for_the_run_process_then_looks_for_the_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    run = sleeper(300)  # ended by the test once the watch is seen waiting for it
    watch = run_watch.start(home, "an-invocation-with-no-run", run.pid, log=tmp_path / "sweep.log")
    watch.stdin.close()  # as a killed command's end of the pipe closes
    time.sleep(2.5)
    assert watch.poll() is None and not (home / "history").exists()  # the run process still runs: it waits
    run.kill()
    run.wait()
    assert watch.wait(timeout=120) == 0
    assert (home / "history" / "runs.db").exists()  # it opened the instance to look for the run
    with DagsterInstance.from_config(str(home)) as instance:  # found no such run, marked nothing
        assert instance.get_runs() == []


def test_a_run_left_started_is_marked_failed_once_its_process_ended_even_unreaped(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    invocation = uuid.uuid4().hex
    with DagsterInstance.from_config(str(home)) as instance:
        started = instance.add_run(DagsterRun(job_name="tiny_sweep", run_id=uuid.uuid4().hex,
                                              tags={INVOCATION_TAG: invocation}, status=DagsterRunStatus.STARTED))
        other = instance.add_run(DagsterRun(job_name="tiny_sweep", run_id=uuid.uuid4().hex,
                                            tags={INVOCATION_TAG: "another"}, status=DagsterRunStatus.STARTED))
    run = sleeper(60)
    log = tmp_path / "sweep.log"
    watch = run_watch.start(home, invocation, run.pid, log=log)
    run_watch.finish(watch, run_ended=False)  # a command that gave up on a run process still running
    run.kill()  # not reaped (a zombie until the end of this test): ended all the same
    assert watch.wait(timeout=60) == 0
    with DagsterInstance.from_config(str(home)) as instance:
        failed = instance.get_run_by_id(started.run_id)
        assert failed.status == DagsterRunStatus.FAILURE
        [record] = instance.get_records_for_run(started.run_id).records
        assert "marked failed by the command's run watch" in record.event_log_entry.message
        assert "the imgtune sweep command that launched it was killed" in record.event_log_entry.message
        assert instance.get_run_by_id(other.run_id).status == DagsterRunStatus.STARTED  # not its run
    assert "marked the run failed" in log.read_text()
    run.wait()
