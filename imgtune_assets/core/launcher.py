"""Runs launched by ``python -m imgtune_assets.cli sweep``, and what becomes of them when it dies.

Plain module (no Dagster). On Linux (elsewhere nothing here acts):

* the sweep command runs each sweep as a ``dagster job execute`` child, tags the run with itself
  (``LAUNCHER_TAG``) and tells the child its process id (``LAUNCHER_PID_ENV``);
* the child — and only it, not a step process or a Ray worker — asks Linux to send it SIGINT when the
  command dies (``end_with_launcher``): Dagster turns SIGINT, as it does Ctrl-C, into an interruption
  of the run, so a command killed by SIGKILL or the OOM killer leaves no run working on for nothing;
  once tied so, the run is tagged with the child's own identity (``RUN_PROCESS_TAG``);
* when the child dies without ending its run, the command marks the run failed; when the command is
  killed, its run watch (``imgtune_assets/run_watch.py``) does, once the child has ended;
* a run still shown as in progress whose tied run process no longer exists (``process_gone``: both
  killed, a power cut) is marked failed by the sweep's next run or the new-images sensor's next tick.

A process is identified by host name, pid namespace, boot and the kernel's start time of the process
(clock ticks since boot, which a change of the wall clock does not move), so that neither a process
that was given the same id later, nor a container that shares the host name, is taken for it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Mapping

LAUNCHER_TAG = "imgtune/launcher"
RUN_PROCESS_TAG = "imgtune/run_process"
LAUNCHER_PID_ENV = "IMGTUNE_LAUNCHER_PID"
# Dagster's tag on a re-executed run (dagster._core.storage.tags.PARENT_RUN_ID_TAG, spelled out: no Dagster here).
PARENT_RUN_ID_TAG = "dagster/parent_run_id"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _machine() -> dict:
    """This machine and pid namespace, as far as process ids go (and this boot of it)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id", encoding="ascii").read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, pidns = None, None
    return {"host": socket.gethostname(), "pidns": pidns, "boot": boot}


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the process's name (field 3, its state, first), None if
    there is no such process (or /proc hides it: then its id is not ours to judge, see process_gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces


def start_ticks(pid: int) -> int | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), None if there is none."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None  # field 22


def still_running(pid: int, started: int | None) -> bool:
    """Whether process ``pid``, started at kernel tick ``started`` (``start_ticks``), still runs: not
    gone, not another process given its id since, and not a zombie (which has ended, and only waits for
    a parent that may never reap it)."""
    fields = _stat_fields(pid)
    return started is not None and fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == started


def process_tag(pid: int | None = None) -> str:
    """This process (or ``pid``) as a tag value (JSON): machine, pid namespace, boot, pid, start time."""
    pid = os.getpid() if pid is None else pid
    return json.dumps({**_machine(), "pid": pid, "start": start_ticks(pid) if _linux() else None})


def _parse(tag: str | None) -> dict | None:
    try:
        value = json.loads(tag) if tag else None
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("pid"), int) or not isinstance(value.get("host"), str):
        return None
    return value


def process_gone(tag: str | None) -> bool:
    """Whether the process a tag names is known to be gone: on this machine and pid namespace, and
    either the machine has booted since or no process with its id and start time exists. False when
    it may still run (alive, elsewhere, hidden from this user, no usable tag, not Linux)."""
    value = _parse(tag)
    here = _machine()
    if value is None or not _linux() or value.get("start") is None or here["boot"] is None:
        return False
    if (value["host"], value.get("pidns")) != (here["host"], here["pidns"]):
        return False
    if value.get("boot") != here["boot"]:
        return True  # a reboot since: every process of then is gone
    if start_ticks(value["pid"]) == value["start"]:
        return False
    try:
        os.kill(value["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process of that id: ours may have been given it, or not
        return start_ticks(value["pid"]) is not None
    return True  # a process of that id exists, started at another time: another process


def own_tag(tags: Mapping[str, str], name: str) -> str | None:
    """A tag of a run that is the run's own: None for a re-execution, whose tags the UI copies from
    the parent run (the processes named there were the parent's)."""
    return None if PARENT_RUN_ID_TAG in tags else tags.get(name)


def end_with_launcher(tag: str | None, environ: Mapping[str, str] = os.environ) -> bool:
    """In the process that the sweep command named by ``tag`` launched (the run's tag, and its pid in
    ``LAUNCHER_PID_ENV``): have Linux send this process SIGINT (SIGTERM where SIGINT is ignored) when the
    command dies, or send it at once if the command died already. Nothing in any other process (a step process that inherited the
    environment while the command lives, a Ray worker, another host) or system. Returns whether this
    process now ends with its launcher."""
    value = _parse(tag)
    if value is None or not _linux() or environ.get(LAUNCHER_PID_ENV) != str(value["pid"]):
        return False
    # SIGINT, which Dagster's run turns into an interruption; SIGTERM where SIGINT is ignored (a
    # process started in the background by a shell inherits that, unless something handles it since).
    ending = signal.SIGTERM if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None) else signal.SIGINT
    if os.getppid() != value["pid"]:
        if process_gone(tag):  # the command died before this process got here: end as it would have
            os.kill(os.getpid(), ending)
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(ending), 0, 0, 0) != 0:
        return False
    if os.getppid() != value["pid"]:  # it died between the check and the request
        os.kill(os.getpid(), ending)
    return True
