"""process_age_seconds against the wall time a parent measures around its child (psutil's
create_time, which Linux rounds to whole boot seconds, fails this by up to a second)."""

import subprocess
import sys
import time

CHILD = ("import sys, time; time.sleep(0.3); from imgtune_assets.core.clock import process_age_seconds; "
         "print(process_age_seconds(), flush=True); sys.stdin.readline()")


def test_a_child_knows_its_age_to_a_few_clock_ticks():
    for _ in range(3):
        launched = time.time()
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        age = float(child.stdout.readline())
        upper = time.time() - launched
        child.communicate("\n", timeout=30)
        # The child slept 0.3 s after it started, and cannot be older than the time since its launch.
        assert 0.3 <= age <= upper + 0.02, (age, upper)

