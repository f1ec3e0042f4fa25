"""The watch over a run that ``python -m imgtune_assets.cli sweep`` launched, for when the command is killed.

When the command dies, Linux interrupts its run process (``core/launcher.py``: ``end_with_launcher``) and
Dagster begins to fail the run; but the command hosted the embedded Ray, whose raylet dies with it, and
Ray then ends the run process before that can record the run's end. Nobody else would: Dagster's run
monitoring does not watch runs that ``dagster job execute`` started, so the run would show as running
until the sweep's next run or the new-images sensor's next tick noticed (``jobs.live_runs_failing_orphans``).

So beside each run it launches, the command starts this watch (``python -m imgtune_assets.run_watch HOME
INVOCATION PROCESS``) in a session of its own — what ends the command's process group does not end it —
reading the command's pipe (``watching``). Once the command has seen the run process end and dealt with
the outcome (marked the run failed itself if need be), it writes ``done``. If the pipe closes without
that, the command was killed or gave up on a run process still running: the watch waits for the run
process to end, then marks the run failed if it still shows as in progress. Dagster is imported only
then; otherwise the watch is a sleeping interpreter. Its output goes to the sweep's log. Linux only,
like the tie between the command and its run (elsewhere nothing is started).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

DONE = b"done\n"
# The run process ends within seconds of the command (interrupted, or ended by its Ray); one still
# there after this is not waited for (the sweep's next run or the sensor still look at it).
RUN_END_WAIT_SECONDS = 300.0
POLL_SECONDS = 0.2


def start(home: Path, invocation: str, run_pid: int, *, log: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen | None:
    """Start the watch over the run tagged ``invocation``, whose process is ``run_pid`` (None where the
    run is not tied to the command: not Linux). Its output is appended to ``log``."""
    if not sys.platform.startswith("linux"):
        return None
    with open(log, "a", encoding="utf-8") if log is not None else open(os.devnull, "w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", __name__, str(home), invocation, str(run_pid)], stdin=subprocess.PIPE,
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)


def finish(watch: subprocess.Popen | None, run_ended: bool) -> None:
    """Dismiss the watch when the command saw the run process end (``run_ended``): it exits without doing
    anything. Otherwise the pipe is only closed, and the watch takes over as if the command had died."""
    if watch is None:
        return
    try:
        if run_ended:
            watch.stdin.write(DONE)
        watch.stdin.close()
        if run_ended:
            watch.wait(timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):  # gone already, or slow: it ends on its own
        pass


@contextlib.contextmanager
def watching(home: Path, invocation: str, run: subprocess.Popen, *, log: Path | None = None,
             env: dict[str, str] | None = None) -> Iterator[subprocess.Popen | None]:
    """The watch over ``run`` for the block, in which the command waits for the run and handles its
    outcome; dismissed at the end if the run process has ended by then."""
    watch = start(home, invocation, run.pid, log=log, env=env)
    try:
        yield watch
    finally:
        finish(watch, run_ended=run.poll() is not None)


def _wait_for_end(pid: int, started: int | None, timeout: float) -> bool:
    """Whether process ``pid`` (started at kernel tick ``started``) ended within ``timeout`` seconds."""
    from imgtune_assets.core.launcher import still_running

    deadline = time.monotonic() + timeout
    while still_running(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def main(argv: list[str]) -> int:
    home, invocation, pid = Path(argv[0]), argv[1], int(argv[2])
    from imgtune_assets.core.launcher import start_ticks

    started = start_ticks(pid)  # read at once: the process, not whatever gets its id later
    if sys.stdin.buffer.read() == DONE:
        return 0
    if not _wait_for_end(pid, started, RUN_END_WAIT_SECONDS):
        print(f"imgtune run watch: the run process {pid} still runs {RUN_END_WAIT_SECONDS:.0f} s after its sweep "
              "command ended; its run is left as it is", flush=True)
        return 1
    from imgtune_assets.cli import fail_unfinished_run

    if fail_unfinished_run(home, invocation, None, how="the imgtune sweep command that launched it was killed",
                           by="the command's run watch"):
        print(f"imgtune run watch: the sweep command ended before its run (tag imgtune/cli_invocation="
              f"{invocation}); marked the run failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
