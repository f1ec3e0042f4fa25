"""Runs launched by ``python -m imgtune_assets.cli sweep``, and what becomes of them when it dies.

Plain module (no Dagster). The sweep command runs each sweep as a ``dagster job execute`` child and
tags the run with itself (``LAUNCHER_TAG``: host, process id and start time, ``launcher_tag``):

* the child asks Linux to send it SIGINT when the command dies (``end_with_launcher``): Dagster turns
  SIGINT, as it does Ctrl-C, into an interruption that fails the run and records why, so a command
  killed by SIGKILL or the OOM killer leaves no run working on for nothing (its Ray, hosted by the
  command, is gone too);
* when the child itself dies without ending its run, the command marks the run failed;
* a run left in progress when both died (a machine that lost power) is recognised by ``launcher_gone``
  (its command's process no longer exists on this host): the new-images sensor marks it failed instead
  of waiting for it for ever.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Mapping

import psutil

LAUNCHER_TAG = "imgtune/launcher"
# Dagster's tag on a re-executed run (dagster._core.storage.tags.PARENT_RUN_ID_TAG, spelled out: no Dagster here).
PARENT_RUN_ID_TAG = "dagster/parent_run_id"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launcher_tag(pid: int | None = None) -> str:
    """This process (or ``pid``) as the tag value: ``{"host", "pid", "started"}`` (JSON)."""
    process = psutil.Process(pid)
    return json.dumps({"host": socket.gethostname(), "pid": process.pid, "started": process.create_time()})


def launched_by(tags: Mapping[str, str]) -> str | None:
    """The launching command of a run, from its tags: None for a re-execution (the UI copies the
    parent's tags, whose command is not this run's) and for a run no sweep command launched."""
    return None if PARENT_RUN_ID_TAG in tags else tags.get(LAUNCHER_TAG)


def _parse(tag: str) -> dict | None:
    try:
        value = json.loads(tag)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("pid"), int) or not isinstance(value.get("host"), str):
        return None
    return value


def _alive(value: dict) -> bool:
    try:
        process = psutil.Process(value["pid"])
        # the same process, not a later one that was given its id
        return abs(process.create_time() - float(value.get("started", 0.0))) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
        return False


def launcher_gone(tag: str | None) -> bool:
    """Whether the command that launched a run (its ``LAUNCHER_TAG``) is known to be gone: its process
    no longer exists on this host. False when it may still run: alive, on another host, or no tag."""
    value = _parse(tag) if tag else None
    if value is None or value["host"] != socket.gethostname():
        return False
    return not _alive(value)


def end_with_launcher(tag: str | None) -> bool:
    """In the process the sweep command launched (``tag`` from the run's tags): have Linux send this
    process SIGINT when the command dies (Dagster's interruption; SIGTERM would end the process before
    it records the run's end), or send it at once if it died already. Nothing elsewhere —
    another host, a process the command did not start itself (a Ray worker running a step), another
    system than Linux. Returns whether this process now ends with its launcher."""
    value = _parse(tag) if tag else None
    if value is None or value["host"] != socket.gethostname() or not sys.platform.startswith("linux"):
        return False
    if os.getppid() != value["pid"]:
        if not _alive(value):  # the command died before this process got here
            os.kill(os.getpid(), signal.SIGINT)
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0) != 0:
        return False
    if os.getppid() != value["pid"]:  # it died between the check and the request
        os.kill(os.getpid(), signal.SIGINT)
    return True
