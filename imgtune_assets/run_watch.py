"""The watch over a run that ``python -m imgtune_assets.cli sweep`` launched, for when the command is killed.

When the command dies, Linux interrupts its run process (``core/launcher.py``: ``end_with_launcher``) and
Dagster begins to fail the run; but the command hosted the embedded Ray, whose raylet dies with it, and
Ray then ends the run process before that can record the run's end. Nobody else would: Dagster's run
monitoring does not watch runs that ``dagster job execute`` started, so the run would show as running
until the sweep's next run or the new-images sensor's next tick noticed (``jobs.runs_in_progress``).

So beside each run it launches, the command starts this watch (``python -m imgtune_assets.run_watch HOME
INVOCATION PROCESS``) in a session of its own — what ends the command's process group does not end it —
reading the command's pipe. The command writes ``done`` once it has seen its run end (and marked it
failed itself if need be). If the pipe closes without that, the command was killed: the watch waits for
the run process to end, then marks the run failed if it still shows as in progress. Dagster is imported
only then; otherwise the watch is a sleeping interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

DONE = b"done\n"
# The run process ends within seconds of the command (interrupted, or ended by its Ray); one still
# there after this is not waited for (the sweep's next run or the sensor still look at it).
RUN_END_WAIT_SECONDS = 300.0
POLL_SECONDS = 0.2


def start(home: Path, invocation: str, run_pid: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the watch over the run tagged ``invocation``, whose process is ``run_pid``; write ``DONE``
    to its stdin (``finish``) once the run is seen to end."""
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(home), invocation, str(run_pid)], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True)


def finish(watch: subprocess.Popen) -> None:
    """Tell the watch the command saw its run end: it exits without doing anything."""
    try:
        watch.stdin.write(DONE)
        watch.stdin.close()
        watch.wait(timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):  # gone already, or slow: it ends on its own
        pass


def _wait_for_end(pid: int, started: int | None, timeout: float) -> bool:
    """Whether process ``pid`` (started at kernel tick ``started``) ended within ``timeout`` seconds."""
    from imgtune_assets.core.launcher import start_ticks

    deadline = time.monotonic() + timeout
    while started is not None and start_ticks(pid) == started:
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
        return 1
    from imgtune_assets.cli import fail_unfinished_run

    fail_unfinished_run(home, invocation, None, how="the imgtune sweep command that launched it was killed",
                        by="the command's run watch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
