"""Side-by-side benchmark: the same sweep three ways, in one process tree, in turn, several rounds.

1. ``cli``    — imgtune as a user runs it: the real ``dagster`` CLI, every trial as one ranged run of
                ``experiment_results``, on the embedded local Ray.
2. ``fanout`` — imgtune's Ray fan-out alone (``imgtune_assets.core.fanout.run_trials``), no Dagster run
                around it, on the same embedded Ray (``RayResource``), started beforehand and not counted.
3. ``floor``  — a ``multiprocessing`` pool over (trial, image) work, images decoded once per worker,
                OpenCV limited to one thread per worker: what a hand-written script costs.

Same images, same trial parameters (drawn by imgtune's sampler from the same sweep file), same metric.
Prints medians over rounds: wall seconds, evaluations per second, ratio to the floor, peak memory of
the whole process tree (sum of PSS, so shared object-store pages count once), and decodes per image.

    python benchmarks/sweep_bench.py --trials 128 --images 64 --size 512 --rounds 3
    python benchmarks/sweep_bench.py --data /path/to/photos   # images/ + targets/ (or a flat folder)
    python benchmarks/sweep_bench.py --scaling                # trials {16,64,256} × images {16,64}

**Large photos** (``--large``, issue 11): ``--photos`` colour photos (default 120) of ``--megapixels``
(default 12: 4000×3000 JPEGs, σ = 20 noise, with clean PNG targets), made from scikit-image's photographs
by ``benchmarks/photos.py`` and kept in ``--data-cache`` (default ``<temp dir>/imgtune-bench-photos``)
for the next run. 120 are 8.6 GB decoded with their targets, 240 more than twice Ray's default object
store (30 % of memory: 7 GB on a 23 GB machine; the table prints its size). A Gaussian-blur sweep
(ksize, sigma; PSNR; random sampler), two modes in turn, every round:

1. ``cli``   — ``python -m imgtune_assets.cli sweep`` itself: the command starts the embedded Ray and
               launches one run of the sweep's job (``sweep_run_command``: ``dagster job execute`` with
               the trials' range), which uses that Ray; a new ``DAGSTER_HOME`` and output folder per
               round. ``--modes cli,steps,floor``
               adds ``steps``: the three ``dagster asset materialize`` commands of ``sweep_commands``
               (manifest and settings, every trial as one ranged run, the report), timed one by one.
2. ``floor`` — ``python benchmarks/photos.py floor``: a ``multiprocessing`` pool, each worker reading,
               hashing (sha256) and decoding a photo and its target once and scoring every trial on it.

Printed per mode: wall (manifest to report; the floor's from launch to exit), ratio to the floor, the
run process's own peak RSS (the kernel's ``VmHWM`` of the ``dagster`` process — or of the floor's
parent — read while it runs; the largest of the three commands), the peak summed PSS of its process
tree (the command's: Ray's GCS, raylet and workers are descendants of the imgtune command that hosts
the Ray, or of the ``dagster`` process of a step-by-step command), what Ray's object
store put on disk (spilled, fallback-allocated), and decodes per image (``decodes_per_image`` of
``last_experiment_run.json``; ``n/a`` if absent); each command's own figures; and imgtune's best trial
(``report.json``) against the floor's score for the same trial.

Bytes spilled: Ray (2.60) spills to ``ray_spilled_objects_<node>/`` in its session folder (its default
``object_spilling_config``), found from the raylet's ``--session_dir`` argument; one uniquely named
file per spilled batch, deleted when its objects are freed. While each command runs, the folder is
listed every 0.5 s and every file's largest size is summed; afterwards the raylet's log
(``logs/raylet.out``) is read for its cumulative ``Spilled N MiB, M objects`` line, which the raylet
writes at most once a second. The larger of the two is printed; both can only under-count (a file
created and deleted between two listings, spills of the last second). A spill folder still there
when the command has exited is removed, so that rounds do not fill the disk.
Fallback MB: an object that does not fit in the store's shared memory even after spilling (say, one
chunk of images larger than the whole store) is allocated in a file of the raylet's
``--fallback_directory`` (the session folder, on disk), unlinked at once and kept mapped; those
mappings are read from ``/proc/<raylet>/maps`` at every listing and the largest size of each file is
summed. On disk too, so it is printed beside the spilled bytes.

**Apply** (``--apply``): ``python -m imgtune_assets.cli apply PIPELINE_YAML INPUT_DIR OUTPUT_DIR``
on the photos' ``images/`` (JPEG in, JPEG out) against ``python benchmarks/photos.py apply-floor``
(a ``multiprocessing`` pool: read, ``apply_pipeline``, ``cv2.imencode`` in the same format, write).
The pipeline: ``--pipeline FILE`` (a ``best_pipeline.yaml``), else the best pipeline of the
``--large`` run just made, else a fixed Gaussian blur written as imgtune's report writes one. Skipped,
with a message, when the command does not exist (argparse's usage error).

    python benchmarks/sweep_bench.py --large --photos 120 --trials 4 --rounds 1
    python benchmarks/sweep_bench.py --large --photos 120 --trials 32 --rounds 1
    python benchmarks/sweep_bench.py --large --photos 240 --trials 4 --rounds 1   # twice the store
    python benchmarks/sweep_bench.py --apply --photos 120 --rounds 1
    python benchmarks/sweep_bench.py --large --apply --photos 6 --megapixels 1 --trials 4 --rounds 1  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import yaml

from imgtune_assets.cli import (
    STEP_LABELS,
    ensure_instance_config,
    launch_logged,
    log_tail,
    sweep_commands,
    sweep_run_command,
)
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.core.evaluate import evaluate_image
from imgtune_assets.core.manifest import load_images, scan_folder
from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.sampling import trial_keys, trial_settings
from imgtune_assets.core.sweepfile import fixed_sweep_document, load_sweep
from imgtune_assets.defs.resources import LOOPBACK_ENV, RayResource

# The project folder: the commands run from here, as a user's would.
ROOT = Path(__file__).resolve().parents[1]
# The large-photo generator and the floors of --large/--apply, run as their own processes.
PHOTOS_SCRIPT = Path(__file__).resolve().with_name("photos.py")

PIPELINE = [
    {"op": "bilateral_filter", "d": {"type": "int", "low": 3, "high": 11},
     "sigma_color": {"type": "float", "low": 10, "high": 150}, "sigma_space": {"type": "float", "low": 2, "high": 20}},
    {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 15},
     "sigma": {"type": "float", "low": 0.3, "high": 3.0, "log": True}},
]


def own_peak_rss(pid: int) -> int:
    """A process's largest resident set so far, in bytes, as the kernel keeps it (``VmHWM``, Linux):
    no peak between two samples is missed. It counts the shared pages the process touched (Ray's object
    store among them), not its children. 0 when unknown (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# The large modes run for minutes: a walk of every process's memory ten times a second would take a
# noticeable share of 2 cores from the measured commands (more from imgtune's dozen processes than from
# the floor's three). Twice a second still sees every peak that matters: the run process's own peak is
# the kernel's high-water mark, not a sample.
LARGE_SAMPLING = {"interval": 0.5, "pss_every": 2}


class Sampler:
    """A background thread that calls ``tick()`` every ``interval`` seconds while in a ``with`` block,
    and ``finish()`` once at its end."""

    interval: float

    def _start_thread(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        self.tick()

    def _run(self):
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.finish()


class TreeMemory(Sampler):
    """Samples the memory of a process and all its descendants: the summed RSS (as asked for; it counts
    shared pages, such as Ray's object store, once per process that maps them) and the summed PSS
    (shared pages split between their processes: closer to what the tree really uses).

    RSS is cheap to read and is sampled every ``interval``; PSS makes the kernel walk every mapping
    (17 ms of CPU per sample for the CLI's ten processes, against 1.5 ms for RSS) and is sampled every
    ``pss_every`` RSS samples, so that measuring does not slow the measured: at 10 Hz PSS sampling alone
    took ~8 % of a 2-core machine from the mode with the most processes."""

    def __init__(self, root_pid: int, interval: float = 0.1, pss_every: int = 10,
                 own: Callable[[list[str]], bool] | None = None):
        self.root_pid, self.interval, self.pss_every = root_pid, interval, pss_every
        self.peak, self.peak_rss, self._samples = 0, 0, 0
        # The run process's own peak RSS, children not counted (see own_peak_rss): the root's, or that
        # of the processes of the tree whose command line ``own`` accepts (the imgtune command's run).
        self.peak_own, self.own = 0, own
        self._own_pids: dict[int, bool] = {}  # a process's command line is read once, not every sample
        self._start_thread()

    def _is_own(self, proc: psutil.Process, root: psutil.Process) -> bool:
        if self.own is None:
            return proc is root
        if proc.pid not in self._own_pids:
            try:
                self._own_pids[proc.pid] = self.own(proc.cmdline())
            except psutil.Error:
                return False
        return self._own_pids[proc.pid]

    def _sample(self, with_pss: bool) -> tuple[int, int]:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0, 0
        pss = rss = 0
        for proc in procs:
            try:
                if with_pss:
                    info = proc.memory_full_info()
                    pss += getattr(info, "pss", info.rss)
                else:
                    info = proc.memory_info()
                rss += info.rss
                if self._is_own(proc, root):  # (its RSS where VmHWM is not available)
                    self.peak_own = max(self.peak_own, own_peak_rss(proc.pid), info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return pss, rss

    def _update(self, with_pss: bool = True):
        pss, rss = self._sample(with_pss)
        self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)

    def tick(self) -> None:
        self._update(with_pss=self._samples % self.pss_every == 0)
        self._samples += 1

    def finish(self) -> None:
        self._update()


# ----------------------------------------------------------------------------- the floor
_floor_images: list = []
_floor_targets: list = []


def _floor_init(data_dir: str):
    import cv2

    cv2.setNumThreads(1)
    global _floor_images, _floor_targets
    _, _floor_images, _floor_targets = load_images(Path(data_dir), scan_folder(Path(data_dir), needs_target=True))


def _floor_eval(job):
    t, i, stages, metric = job
    return t, i, evaluate_image(stages, _floor_images[i], _floor_targets[i], Objective(metric))["score"]


def run_floor(data_dir: Path, trials: list[dict], n_images: int, metric: str, workers: int) -> dict:
    jobs = [(t, i, [tuple(s) for s in trial["stages"]], metric) for t, trial in enumerate(trials) for i in range(n_images)]
    ctx = mp.get_context("forkserver")
    start = time.perf_counter()
    with TreeMemory(os.getpid()) as mem:
        with ctx.Pool(workers, initializer=_floor_init, initargs=(str(data_dir),)) as pool:
            results = pool.map(_floor_eval, jobs, chunksize=max(1, len(jobs) // (workers * 16)))
    wall = time.perf_counter() - start
    scores = {}
    for t, _, s in results:
        scores.setdefault(t, []).append(s)
    return {"wall": wall, "peak": mem.peak, "peak_rss": mem.peak_rss, "decodes_per_image": workers,
            "scores": [sum(v) / len(v) for _, v in sorted(scores.items())]}


# ----------------------------------------------------------------------------- fan-out alone
def run_fanout(data_dir: Path, trials: list[dict], metric: str) -> dict:
    import ray

    from imgtune_assets.core.fanout import ImageFiles, run_trials

    start = time.perf_counter()
    with TreeMemory(os.getpid()) as mem:
        rows = scan_folder(data_dir, needs_target=True)
        # As a run does it: Ray tasks decode the files, each once.
        result = run_trials(trials, ImageFiles(data_dir, rows), Objective(metric))
    wall = time.perf_counter() - start
    assert ray.is_initialized()
    files = sum(1 for r in rows if r.status == "ok") + sum(1 for r in rows if r.status == "ok" and r.target_path)
    return {"wall": wall, "peak": mem.peak, "peak_rss": mem.peak_rss, "decodes_per_image": result.decodes / files,
            "scores": [o.score for o in result.outcomes]}


# ----------------------------------------------------------------------------- the dagster CLI
def cli_environment(work: Path, sweep_file: Path, round_no: int, prefix: str = "") -> tuple[dict, Path, Path]:
    """(environment, output folder, log file) for one round of imgtune's commands: a new DAGSTER_HOME
    with the project's dagster.yaml, as a user's would get, and a new output folder."""
    env = dict(os.environ, **LOOPBACK_ENV)
    home = work / f"{prefix}dagster_home_{round_no}"
    ensure_instance_config(home)
    out_dir = work / f"{prefix}out_{round_no}"
    env.update({"DAGSTER_HOME": str(home), "IMGTUNE_SWEEP": str(sweep_file), "IMGTUNE_OUTPUT_DIR": str(out_dir)})
    return env, out_dir, work / f"{prefix}dagster_{round_no}.log"


def run_cli(work: Path, sweep_file: Path, keys: list[str], round_no: int) -> dict:
    """The CLI's own command lines (``imgtune_assets.cli.sweep_commands``): the manifest and settings
    first (not timed), then every trial as one ranged run, timed from launch to exit. Dagster's output
    goes to a log file, as with ``python -m imgtune_assets.cli sweep``."""
    env, out_dir, log = cli_environment(work, sweep_file, round_no)
    name = load_sweep(sweep_file).name  # the asset key prefix
    settings, trials_command, _report = sweep_commands(name, keys)

    def failed(command: list[str]) -> RuntimeError:
        tail = "\n".join(log_tail(log))
        return RuntimeError(f"dagster CLI failed: {' '.join(command)}\n{tail}\n(log: {log})")

    if launch_logged(settings, log, env=env, cwd=ROOT).wait() != 0:
        raise failed(settings)
    start, launched_at = time.perf_counter(), time.time()
    proc = launch_logged(trials_command, log, env=env, cwd=ROOT)
    with TreeMemory(proc.pid) as mem:
        code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise failed(trials_command)
    stats = json.loads((out_dir / name / "last_experiment_run.json").read_text())
    scores = [json.loads((out_dir / name / "trials" / f"{k}.json").read_text())["score"] for k in keys]
    # Fixed start-up as the user sees it: from launching the command to the first trial task submitted.
    stats["startup_seconds"] = stats["fanout_started_at"] - launched_at
    return {"wall": wall, "peak": mem.peak, "peak_rss": mem.peak_rss, "decodes_per_image": stats["decodes_per_image"], "scores": scores,
            "stats": stats}


def prepare(work: Path, args) -> tuple[Path, Path, list[dict], int]:
    if args.data:
        data = Path(args.data).resolve()
    else:
        data = work / "data"
        make_denoise_set(data, count=args.images, size=args.size, seed=args.seed)
    sweep_file = work / "bench.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "bench", "data_dir": str(data), "objective": {"metric": "psnr"}, "trials": args.trials,
        "seed": args.seed, "sampler": "random", "pipeline": PIPELINE}, sort_keys=False))
    sweep = load_sweep(sweep_file)
    trials = [trial_settings(sweep, k) for k in range(sweep.trials)]
    n_images = sum(1 for r in scan_folder(data, needs_target=True) if r.status == "ok")
    return data, sweep_file, trials, n_images


def measure(args, work: Path) -> dict:
    data, sweep_file, trials, n_images = prepare(work, args)
    keys = trial_keys(load_sweep(sweep_file))
    evals = len(trials) * n_images
    os.environ.update(LOOPBACK_ENV)
    results: dict[str, list[dict]] = {"cli": [], "fanout": [], "floor": []}
    for round_no in range(args.rounds):
        for mode in args.modes:
            if mode == "fanout":
                # The same embedded Ray the CLI run starts (RayResource), started before the clock.
                embedded = RayResource(num_cpus=args.workers)
                embedded.connect()
                res = run_fanout(data, trials, "psnr")
                embedded.teardown_after_execution(None)
                res["ray_start"] = embedded.connect_seconds
            elif mode == "floor":
                res = run_floor(data, trials, n_images, "psnr", args.workers)
            else:
                res = run_cli(work, sweep_file, keys, round_no)
            results[mode].append(res)
            detail = ""
            if mode == "cli":
                st = res["stats"]
                detail = (f"  (start-up {st['startup_seconds']:.2f} s, of which Ray {st['ray_start_seconds']:.2f} s; "
                          f"fan-out {st['fanout_seconds']:.2f} s; after it {res['wall'] - st['startup_seconds'] - st['fanout_seconds']:.2f} s)")
            print(f"  round {round_no + 1} {mode:6s} {res['wall']:7.2f} s{detail}", flush=True)
    # All three evaluated the same parameters on the same images: the scores must agree.
    reference = results[args.modes[-1]][0]["scores"]
    for mode in args.modes:
        for res in results[mode]:
            assert all(abs(a - b) < 1e-6 for a, b in zip(res["scores"], reference)), f"{mode} scores differ"
    return {"results": results, "evals": evals, "n_images": n_images, "trials": len(trials)}


def table(summary: dict, modes: list[str]) -> str:
    res, evals = summary["results"], summary["evals"]
    floor = statistics.median(r["wall"] for r in res["floor"]) if res.get("floor") else None
    lines = [f"{'mode':8s} {'wall s':>8s} {'evals/s':>9s} {'× floor':>8s} {'RSS MB':>8s} {'PSS MB':>8s} {'decodes/img':>12s}"]
    for mode in modes:
        wall = statistics.median(r["wall"] for r in res[mode])
        peak = statistics.median(r["peak"] for r in res[mode]) / 2**20
        peak_rss = statistics.median(r["peak_rss"] for r in res[mode]) / 2**20
        ratio = f"{wall / floor:8.2f}" if floor else f"{'-':>8s}"
        decodes = statistics.median(r["decodes_per_image"] for r in res[mode])
        lines.append(f"{mode:8s} {wall:8.2f} {evals / wall:9.1f} {ratio} {peak_rss:8.0f} {peak:8.0f} {decodes:12g}")
    if res.get("cli"):
        stats = [r["stats"] for r in res["cli"]]
        # The images are decoded by Ray tasks inside the fan-out (decode_task_seconds: their CPU time).
        parts = {k: statistics.median(s.get(k, 0.0) for s in stats)
                 for k in ("ray_start_seconds", "decode_task_seconds", "fanout_seconds")}
        walls = [r["wall"] for r in res["cli"]]
        startup = statistics.median(w - s["fanout_seconds"] for w, s in zip(walls, stats))
        lines.append(f"cli breakdown (median): ray start {parts['ray_start_seconds']:.2f} s, fan-out "
                     f"{parts['fanout_seconds']:.2f} s (decode tasks {parts['decode_task_seconds']:.2f} CPU-s), "
                     f"everything else (process + run start/finish, Ray start/stop) {startup:.2f} s")
        lines.append(f"fixed start-up (command launched → first trial submitted, median): "
                     f"{statistics.median(s['startup_seconds'] for s in stats):.2f} s")
    if res.get("fanout"):
        lines.append(f"fanout: Ray start (not in its wall) median {statistics.median(r['ray_start'] for r in res['fanout']):.2f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- large photos (issue 11)
PHOTO_PIPELINE = [{"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 15},
                   "sigma": {"type": "float", "low": 0.3, "high": 3.0, "log": True}}]
# What --apply applies when neither --pipeline nor a --large run's best pipeline is at hand.
FIXED_BLUR = [("gaussian_blur", {"ksize": 5, "sigma": 1.5})]
MiB = 2**20


class RaySpill(Sampler):
    """What the object store of the embedded Ray that ``root_pid`` starts puts on disk while ``root_pid``
    runs (see the module's docstring): bytes spilled — its spill folder listed every ``interval`` (the
    largest size of every file, summed) and, at the end, the raylet's cumulative ``Spilled N MiB`` log
    line; the larger of the two — and bytes of fallback allocations — the raylet's memory maps of
    (deleted) files in its fallback folder, sampled at the same time. Also the object store's size, from
    the raylet's command line."""

    LOG_LINE = re.compile(r"Spilled (\d+) MiB, (\d+) objects")

    def __init__(self, root_pid: int, interval: float = 0.5):
        self.root_pid, self.interval = root_pid, interval
        self.session_dir: Path | None = None
        self.fallback_dir: str | None = None
        self.raylet: psutil.Process | None = None
        self.object_store_bytes: int | None = None
        self.logged_bytes = 0
        self._files: dict[str, int] = {}
        self._fallback: dict[str, int] = {}
        self._start_thread()

    @property
    def listed_bytes(self) -> int:
        return sum(self._files.values())

    @property
    def spilled_bytes(self) -> int:
        return max(self.listed_bytes, self.logged_bytes)

    @property
    def fallback_bytes(self) -> int:
        return sum(self._fallback.values())

    def _find_raylet(self) -> None:
        # This command's own Ray, not any other on the machine (/tmp/ray/session_latest is whichever
        # started last): the raylet among the command's descendants, and the folders it was given.
        try:
            procs = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                if proc.name() != "raylet":
                    continue
                args = dict(a[2:].split("=", 1) for a in proc.cmdline() if a.startswith("--") and "=" in a)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if args.get("session_dir"):
                self.raylet, self.session_dir = proc, Path(args["session_dir"])
                self.fallback_dir = args.get("fallback_directory") or str(self.session_dir)
                if args.get("object_store_memory", "").isdigit():
                    self.object_store_bytes = int(args["object_store_memory"])
                return

    def _spill_dirs(self) -> list[Path]:
        return sorted(self.session_dir.glob("ray_spilled_objects_*")) if self.session_dir else []

    def _sample(self) -> None:
        if self.session_dir is None:
            self._find_raylet()
        self._sample_fallback()
        for folder in self._spill_dirs():
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    size = entry.stat().st_size
                except OSError:  # deleted since the listing
                    continue
                self._files[entry.path] = max(self._files.get(entry.path, 0), size)

    def _sample_fallback(self) -> None:
        # Objects that do not fit in the store's shared memory are allocated in files of the fallback
        # folder, unlinked at once and kept mapped by the raylet: only its memory maps show them.
        if self.raylet is None:
            return
        try:
            with open(f"/proc/{self.raylet.pid}/maps", encoding="utf-8", errors="replace") as maps:
                lines = maps.readlines()
        except OSError:  # the raylet is gone
            return
        sizes: dict[str, int] = {}
        prefix = os.path.join(self.fallback_dir, "plasma")
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                key = f"{fields[4]}:{fields[5].strip()}"  # inode and name: names can come back
                sizes[key] = sizes.get(key, 0) + end - start
        for key, size in sizes.items():
            self._fallback[key] = max(self._fallback.get(key, 0), size)

    def _read_log(self) -> None:
        if self.session_dir is None:
            return
        for log in (self.session_dir / "logs").glob("raylet*"):
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            for match in self.LOG_LINE.finditer(text):
                self.logged_bytes = max(self.logged_bytes, int(match.group(1)) * MiB)

    def tick(self) -> None:
        self._sample()

    def finish(self) -> None:
        self._sample()
        self._read_log()
        # Nothing reads these files once the command's Ray is gone, and a round can leave gigabytes.
        for folder in self._spill_dirs():
            shutil.rmtree(folder, ignore_errors=True)


def watched(command: list[str], log: Path, env: dict | None = None, ray: bool = False) -> dict:
    """Run ``command`` from the project folder, its output appended to ``log``: exit code, wall seconds
    from launch to exit, its own peak RSS and its process tree's peak PSS (and summed RSS); with ``ray``,
    what its embedded Ray's object store put on disk too."""
    start = time.perf_counter()
    proc = launch_logged(command, log, env=env, cwd=ROOT)
    with TreeMemory(proc.pid, **LARGE_SAMPLING) as mem, \
            (RaySpill(proc.pid) if ray else contextlib.nullcontext()) as spill:
        code = proc.wait()
    res = {"code": code, "wall": time.perf_counter() - start, "peak": mem.peak, "peak_rss": mem.peak_rss,
           "peak_own": mem.peak_own}
    if spill is not None:
        res.update(spilled=spill.spilled_bytes, fallback=spill.fallback_bytes)
    return res


def command_failed(command: list[str], log: Path) -> RuntimeError:
    tail = "\n".join(log_tail(log))
    return RuntimeError(f"command failed: {' '.join(command)}\n{tail}\n(log: {log})")


# What a user types (IMGTUNE_SWEEP names the one sweep served).
IMGTUNE_SWEEP_COMMAND = [sys.executable, "-m", "imgtune_assets.cli", "sweep", "--quiet"]


def is_dagster_command(cmdline: list[str]) -> bool:
    """The ``dagster`` CLI's process (``.../bin/dagster job execute ...``): a run's process."""
    return any(Path(part).name == "dagster" for part in cmdline[:2])


def run_cli_large(work: Path, sweep_file: Path, keys: list[str], round_no: int, one_run: bool = True) -> dict:
    """imgtune end to end as a user runs it: ``python -m imgtune_assets.cli sweep`` (the command, which
    hosts the embedded Ray, and its one run of the sweep's job, ``sweep_run_command``), or
    (``one_run=False``, mode ``steps``) the three commands of ``sweep_commands``, timed together
    (manifest to report) and one by one; each command's process tree and its Ray watched, and the run
    process's own memory (the ``dagster`` process the command launches)."""
    env, out_dir, log = cli_environment(work, sweep_file, round_no)
    name = load_sweep(sweep_file).name
    res: dict = {"steps": {}, "peak": 0, "peak_rss": 0, "peak_own": 0, "spilled": 0, "fallback": 0,
                 "object_store": None}
    start = time.perf_counter()
    commands = ([("the imgtune sweep command", IMGTUNE_SWEEP_COMMAND)] if one_run
                else list(zip(STEP_LABELS, sweep_commands(name, keys))))
    for label, command in commands:
        step_start = time.perf_counter()
        proc = launch_logged(command, log, env=env, cwd=ROOT)
        with TreeMemory(proc.pid, **LARGE_SAMPLING, own=is_dagster_command) as mem, RaySpill(proc.pid) as spill:
            code = proc.wait()
        res["steps"][label] = {"wall": time.perf_counter() - step_start, "peak_own": mem.peak_own, "peak": mem.peak,
                               "spilled": spill.spilled_bytes, "fallback": spill.fallback_bytes}
        if code != 0:
            raise command_failed(command, log)
        res["peak"], res["peak_rss"] = max(res["peak"], mem.peak), max(res["peak_rss"], mem.peak_rss)
        res["peak_own"] = max(res["peak_own"], mem.peak_own)
        res["spilled"] += spill.spilled_bytes
        res["fallback"] += spill.fallback_bytes
        res["object_store"] = res["object_store"] or spill.object_store_bytes
        if spill.session_dir is not None:
            res["ray_session"] = spill.session_dir
    res["wall"] = time.perf_counter() - start
    sweep_dir = out_dir / name
    report = json.loads((sweep_dir / "report.json").read_text())
    stats_file = sweep_dir / "last_experiment_run.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    res["decodes_per_image"] = stats.get("decodes_per_image")
    res["stats"] = stats
    res["best_trial"], res["best_score"] = report.get("best_trial"), report.get("best_score")
    res["scores"] = {k: json.loads((sweep_dir / "trials" / f"{k}.json").read_text())["score"] for k in keys}
    res["best_pipeline"] = sweep_dir / "best_pipeline.yaml"
    return res


def run_floor_large(work: Path, sweep_file: Path, workers: int, round_no: int) -> dict:
    """``photos.py floor`` as its own process, as a hand-written script runs: its whole life is timed."""
    result_file, log = work / f"floor_{round_no}.json", work / f"floor_{round_no}.log"
    command = [sys.executable, str(PHOTOS_SCRIPT), "floor", str(sweep_file), str(result_file),
               "--workers", str(workers)]
    res = watched(command, log)
    if res["code"] != 0:
        raise command_failed(command, log)
    out = json.loads(result_file.read_text())
    res.update(scores=out["scores"], decodes_per_image=out["decodes_per_image"], images=out["images"])
    return res


def write_photo_sweep(work: Path, data: Path, args) -> Path:
    sweep_file = work / "photos.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "photos", "data_dir": str(data), "objective": {"metric": "psnr"}, "trials": args.trials,
        "seed": args.seed, "sampler": "random", "pipeline": PHOTO_PIPELINE}, sort_keys=False))
    return sweep_file


def warm_page_cache(files: list[str]) -> None:
    """Read every file once, untimed: the first mode of the first round would otherwise pay the disk
    reads that every later one finds in the page cache."""
    for file in files:
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def step_line(step: dict) -> str:
    return (f"{step['wall']:7.2f} s  run RSS {step['peak_own'] / MiB:6.0f} MB  tree PSS {step['peak'] / MiB:6.0f} MB  "
            f"spilled {step['spilled'] / MiB:6.0f} MB  fallback {step['fallback'] / MiB:6.0f} MB")


def measure_large(args, work: Path, sweep_file: Path) -> dict:
    keys = trial_keys(load_sweep(sweep_file))
    modes = [m for m in args.modes if m in ("cli", "steps", "floor")]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for round_no in range(args.rounds):
        for mode in modes:  # in turn, the floor last, every round
            if mode in ("cli", "steps"):
                res = run_cli_large(work, sweep_file, keys, round_no, one_run=mode == "cli")
                detail = "".join(f"\n      {label:30s} {step_line(step)}" for label, step in res["steps"].items())
                st = res["stats"]
                if "fanout_seconds" in st:
                    # the experiment step's process: from its launch to the first task, the tasks, the rest
                    step_wall = list(res["steps"].values())[-1 if mode == "cli" else 1]["wall"]
                    detail += (f"\n      experiment step: start-up {st['startup_seconds']:.2f} s (Ray ready after "
                               f"{st['ray_start_seconds']:.2f} s), fan-out {st['fanout_seconds']:.2f} s "
                               f"({st.get('chunks')} chunks{', fused' if st.get('fused') else ''}), the rest "
                               f"{step_wall - st['startup_seconds'] - st['fanout_seconds']:.2f} s")
            else:
                res = run_floor_large(work, sweep_file, args.workers, round_no)
                detail = f"  (run RSS {res['peak_own'] / MiB:.0f} MB, tree PSS {res['peak'] / MiB:.0f} MB)"
            results[mode].append(res)
            print(f"  round {round_no + 1} {mode:6s} {res['wall']:7.2f} s{detail}", flush=True)
    return {"results": results, "keys": keys, "modes": modes}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def large_table(summary: dict) -> str:
    res, keys, modes = summary["results"], summary["keys"], summary["modes"]
    floor = _median(r["wall"] for r in res["floor"]) if res.get("floor") else None
    lines = [f"{'mode':6s} {'wall s':>8s} {'× floor':>8s} {'run RSS MB':>11s} {'tree PSS MB':>12s} "
             f"{'spilled MB':>11s} {'fallback MB':>12s} {'decodes/img':>12s}"]
    for mode in modes:
        wall = _median(r["wall"] for r in res[mode])
        ratio = f"{wall / floor:8.2f}" if floor else f"{'-':>8s}"
        decodes = _median(r["decodes_per_image"] for r in res[mode])
        disk = (f"{_median(r['spilled'] for r in res[mode]) / MiB:11.0f} "
                f"{_median(r['fallback'] for r in res[mode]) / MiB:12.0f}"
                if mode != "floor" else f"{'-':>11s} {'-':>12s}")  # no object store in the floor
        lines.append(f"{mode:6s} {wall:8.2f} {ratio} {_median(r['peak_own'] for r in res[mode]) / MiB:11.0f} "
                     f"{_median(r['peak'] for r in res[mode]) / MiB:12.0f} {disk} "
                     f"{'n/a' if decodes is None else format(decodes, 'g'):>12s}")
    for mode in ("cli", "steps"):
        if not res.get(mode):
            continue
        cli = res[mode]
        lines.append(f"{mode} per command (median over rounds):")
        for label in cli[0]["steps"]:
            step = {k: _median(r["steps"][label][k] for r in cli) for k in cli[0]["steps"][label]}
            lines.append(f"  {label:30s} {step_line(step)}")
    if res.get("cli") or res.get("steps"):
        cli = res.get("cli") or res["steps"]
        store = _median(r["object_store"] for r in cli)
        session = cli[-1].get("ray_session")
        lines.append("Ray object store: " + (f"{store / MiB:.0f} MB" if store else "not seen (no raylet found)")
                     + (f"; last round's Ray session (its logs): {session}" if session else ""))
    if res.get("cli") and res.get("floor"):
        cli, floor_scores = res["cli"][-1], res["floor"][-1]["scores"]
        best = cli["best_trial"]
        if best in keys:
            ours = floor_scores[keys.index(best)]
            lines.append(f"score check: imgtune's best {best} psnr {float(cli['best_score']):.6f}, floor's "
                         f"{ours:.6f}, |difference| {abs(float(cli['best_score']) - ours):.2g}")
        else:
            lines.append(f"score check: imgtune's report names no best trial ({best!r})")
        diffs = [abs(cli["scores"][k] - s) for k, s in zip(keys, floor_scores)]
        lines.append(f"all {len(keys)} trials: largest |imgtune − floor| {max(diffs):.2g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- apply (issue 11)
class ApplyUnavailable(Exception):
    """imgtune's CLI has no ``apply`` command (yet): argparse refused it."""


def image_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")}


def run_apply_cli(work: Path, sweep_file: Path, pipeline: Path, input_dir: Path, round_no: int) -> dict:
    env, _out_dir, log = cli_environment(work, sweep_file, round_no, prefix="apply_")
    output = work / f"apply_cli_{round_no}"
    command = [sys.executable, "-m", "imgtune_assets.cli", "apply", str(pipeline), str(input_dir), str(output)]
    res = watched(command, log, env=env, ray=True)
    if res["code"] != 0:
        tail = "\n".join(log_tail(log))
        if res["code"] == 2 and ("invalid choice" in tail or "usage:" in tail):
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            raise ApplyUnavailable(f"its argument parser says: {last.strip()}; log: {log}")
        raise command_failed(command, log)
    res["output"] = output
    return res


def run_apply_floor(work: Path, pipeline: Path, input_dir: Path, workers: int, round_no: int) -> dict:
    output, log = work / f"apply_floor_{round_no}", work / f"apply_floor_{round_no}.log"
    command = [sys.executable, str(PHOTOS_SCRIPT), "apply-floor", str(pipeline), str(input_dir), str(output),
               "--workers", str(workers)]
    res = watched(command, log)
    if res["code"] != 0:
        raise command_failed(command, log)
    res["output"] = output
    return res


def apply_pipeline_file(work: Path, sweep_file: Path, args, large: dict | None) -> tuple[Path, str]:
    """(the best_pipeline.yaml to apply, where it comes from)."""
    if args.pipeline:
        return Path(args.pipeline).resolve(), "--pipeline"
    if large and large["results"].get("cli"):
        best = large["results"]["cli"][-1]["best_pipeline"]
        if best.exists():
            return best, f"the best pipeline of the --large sweep ({large['results']['cli'][-1]['best_trial']})"
    doc = fixed_sweep_document(load_sweep(sweep_file), FIXED_BLUR, name="photos-fixed")
    path = work / "fixed_pipeline.yaml"
    path.write_text("# A fixed Gaussian blur, in the shape of imgtune's best_pipeline.yaml.\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    return path, f"a fixed {FIXED_BLUR}"


def compare_outputs(inputs: dict[str, Path], res: dict, reference: dict | None) -> str:
    """Whether every input has an output of the same name, and how far one output's pixels are from the
    floor's (both decoded): the same pipeline differs only by the encoder's settings."""
    import cv2

    outputs = image_files(res["output"])
    by_name = {Path(k).name: p for k, p in outputs.items()}
    missing = [name for name in (Path(k).name for k in inputs) if name not in by_name]
    note = f"{len(outputs)} files, {sum(p.stat().st_size for p in outputs.values()) / MiB:.0f} MB"
    if "spilled" in res:
        note += f"; Ray spilled {res['spilled'] / MiB:.0f} MB, fallback {res['fallback'] / MiB:.0f} MB"
    if missing:
        note += f"; {len(missing)} input(s) without an output of the same name (e.g. {missing[0]})"
    if reference is not None and by_name:
        name = sorted(by_name)[0]
        theirs = image_files(reference["output"])
        other = next((p for k, p in theirs.items() if Path(k).name == name), None)
        if other is not None:
            a, b = cv2.imread(str(by_name[name]), cv2.IMREAD_UNCHANGED), cv2.imread(str(other), cv2.IMREAD_UNCHANGED)
            if a is not None and b is not None and a.shape == b.shape:
                note += f"; {name}: mean |cli − floor| {float(abs(a.astype(float) - b).mean()):.2f} levels"
            else:
                shapes = [None if x is None else x.shape for x in (a, b)]
                note += f"; {name}: cannot compare (decoded shapes {shapes[0]} and {shapes[1]})"
    return note


def measure_apply(args, work: Path, sweep_file: Path, input_dir: Path, large: dict | None) -> int:
    pipeline, origin = apply_pipeline_file(work, sweep_file, args, large)
    inputs = image_files(input_dir)
    print(f"\napply: {origin} ({pipeline}) to {len(inputs)} files of {input_dir}; {args.rounds} rounds", flush=True)
    results: dict[str, list[dict]] = {"cli": [], "floor": []}
    for round_no in range(args.rounds):
        try:
            cli = run_apply_cli(work, sweep_file, pipeline, input_dir, round_no)
        except ApplyUnavailable as exc:
            print(f"apply skipped: `python -m imgtune_assets.cli apply` is not available ({exc})", flush=True)
            return 0
        floor = run_apply_floor(work, pipeline, input_dir, args.workers, round_no)
        for mode, res, reference in (("cli", cli, floor), ("floor", floor, None)):
            res["note"] = compare_outputs(inputs, res, reference)
            results[mode].append(res)
            print(f"  round {round_no + 1} {mode:6s} {res['wall']:7.2f} s  ({res['note']})", flush=True)
        for res in (cli, floor):  # a round's outputs can be gigabytes
            shutil.rmtree(res["output"], ignore_errors=True)
    floor_wall = _median(r["wall"] for r in results["floor"])
    print(f"\n{'mode':6s} {'wall s':>8s} {'× floor':>8s} {'run RSS MB':>11s} {'tree PSS MB':>12s}")
    for mode in ("cli", "floor"):
        wall = _median(r["wall"] for r in results[mode])
        print(f"{mode:6s} {wall:8.2f} {wall / floor_wall:8.2f} "
              f"{_median(r['peak_own'] for r in results[mode]) / MiB:11.0f} "
              f"{_median(r['peak'] for r in results[mode]) / MiB:12.0f}")
    return 0


def run_photos(args) -> int:
    """``--large`` and/or ``--apply``: on generated (cached) large photos, or on ``--data``."""
    if str(PHOTOS_SCRIPT.parent) not in sys.path:  # imported as a module rather than run as a script
        sys.path.insert(0, str(PHOTOS_SCRIPT.parent))
    import photos

    if args.data:
        data = Path(args.data).resolve()
    else:
        data = photos.photo_set(args.photos, args.megapixels, args.seed, args.data_cache, args.workers)
    pairs = photos.image_pairs(data)
    if not pairs:
        print(f"error: no image with a target of the same stem in {data}/images and {data}/targets", file=sys.stderr)
        return 2
    import cv2

    shape = cv2.imread(pairs[0][1], cv2.IMREAD_UNCHANGED).shape
    decoded = len(pairs) * 2 * shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1)  # as imgtune holds them
    warm_page_cache([f for _, image, target in pairs for f in (image, target)])
    with tempfile.TemporaryDirectory(prefix="imgtune-bench-photos-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        sweep_file = write_photo_sweep(work, data, args)
        large = None
        if args.large:
            print(f"sweep: {args.trials} trials × {len(pairs)} photos ({shape[1]}×{shape[0]}, {data}; "
                  f"{decoded / MiB:.0f} MB decoded with their targets), gaussian_blur, PSNR; {args.rounds} rounds",
                  flush=True)
            large = measure_large(args, work, sweep_file)
            print(f"\n{args.trials} trials × {len(pairs)} photos, end to end (manifest to report)")
            print(large_table(large))
        if args.apply:
            images = data / "images" if (data / "images").is_dir() else data
            try:
                return measure_apply(args, work, sweep_file, images, large)
            except RuntimeError as exc:
                print(f"apply failed: {exc}", file=sys.stderr)
                return 1
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    return f"{os.cpu_count()} CPU ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=None, help="default: 128; 4 with --large")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--data", help="a folder of images (images/ + targets/) instead of generated ones")
    parser.add_argument("--modes", default="cli,fanout,floor", help="comma-separated subset of cli,fanout,floor (with --large: cli,steps,floor)")
    parser.add_argument("--scaling", action="store_true", help="trials {16,64,256} × images {16,64}, one round each")
    photos = parser.add_argument_group("large photos and apply (issue 11)")
    photos.add_argument("--large", action="store_true", help="imgtune end to end against the floor on large photos")
    photos.add_argument("--apply", action="store_true",
                        help="`python -m imgtune_assets.cli apply` against a multiprocessing loop on the photos")
    photos.add_argument("--photos", type=int, default=120, help="how many photos (default 120)")
    photos.add_argument("--megapixels", type=float, default=12, help="photo size, 4:3 (default 12: 4000×3000)")
    photos.add_argument("--data-cache", default=None,
                        help="where generated photos are kept and reused (default: <temp dir>/imgtune-bench-photos)")
    photos.add_argument("--pipeline", default=None, help="--apply: a best_pipeline.yaml to apply")
    args = parser.parse_args(argv)
    if args.trials is None:
        args.trials = 4 if args.large else 128
    args.modes = [m for m in args.modes.split(",") if m]
    if "floor" in args.modes:  # the floor runs last in each round and is the reference
        args.modes = [m for m in args.modes if m != "floor"] + ["floor"]
    print(f"machine: {machine()}")
    if args.large or args.apply:
        return run_photos(args)
    if args.scaling:
        rows = []
        for images in (16, 64):
            for trials in (16, 64, 256):
                with tempfile.TemporaryDirectory(prefix="imgtune-bench-") as tmp:
                    sub = argparse.Namespace(**{**vars(args), "trials": trials, "images": images, "rounds": 1})
                    print(f"trials {trials} × images {images}:", flush=True)
                    summary = measure(sub, Path(tmp))
                rows.append((trials, images, {m: summary["results"][m][0]["wall"] for m in args.modes}))
        print(f"\n{'trials':>6s} {'images':>6s} " + " ".join(f"{m + ' s':>9s}" for m in args.modes)
              + ("  cli ms/eval (slope)" if "cli" in args.modes else ""))
        for trials, images, walls in rows:
            print(f"{trials:6d} {images:6d} " + " ".join(f"{walls[m]:9.2f}" for m in args.modes))
        for mode in args.modes:
            xs = [t * i for t, i, _ in rows]
            ys = [w[mode] for _, _, w in rows]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            print(f"{mode}: wall ≈ {my - slope * mx:.2f} s + {slope * 1000:.3f} ms × (trials × images)")
        return 0
    with tempfile.TemporaryDirectory(prefix="imgtune-bench-") as tmp:
        print(f"sweep: {args.trials} trials × {args.images if not args.data else 'given'} images, "
              f"bilateral_filter + gaussian_blur, PSNR; {args.rounds} rounds; modes {', '.join(args.modes)}", flush=True)
        summary = measure(args, Path(tmp))
    print(f"\n{summary['trials']} trials × {summary['n_images']} images = {summary['evals']} evaluations")
    print(table(summary, args.modes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
