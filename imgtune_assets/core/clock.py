"""How long this process has been running, precisely enough to time a start-up."""

from __future__ import annotations

import os
import time

from imgtune_assets.core.launcher import start_ticks


def process_age_seconds() -> float:
    """Seconds since this process started, to the kernel's clock tick (10 ms).

    ``psutil.Process().create_time()`` adds the boot time, which Linux reports in whole seconds: start-ups
    timed with it came out up to a second long. Here both ends come from the same clock (/proc/uptime
    and the process's start tick). Elsewhere, psutil's figure is the fallback.
    """
    try:
        started = start_ticks(os.getpid())
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux's /proc: psutil's figure below
        started = None
    if started is not None:
        return uptime - started / os.sysconf("SC_CLK_TCK")
    import psutil

    return time.time() - psutil.Process().create_time()
