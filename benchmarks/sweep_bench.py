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
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from imgtune_assets.cli import ensure_instance_config, launch_logged, log_tail, sweep_commands
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.core.evaluate import evaluate_image
from imgtune_assets.core.manifest import load_images, scan_folder
from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.sampling import trial_keys, trial_settings
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.resources import LOOPBACK_ENV, RayResource

# The project folder: the commands run from here, as a user's would.
ROOT = Path(__file__).resolve().parents[1]

PIPELINE = [
    {"op": "bilateral_filter", "d": {"type": "int", "low": 3, "high": 11},
     "sigma_color": {"type": "float", "low": 10, "high": 150}, "sigma_space": {"type": "float", "low": 2, "high": 20}},
    {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 15},
     "sigma": {"type": "float", "low": 0.3, "high": 3.0, "log": True}},
]


class TreeMemory:
    """Samples the memory of a process and all its descendants: the summed RSS (as asked for; it counts
    shared pages, such as Ray's object store, once per process that maps them) and the summed PSS
    (shared pages split between their processes: closer to what the tree really uses).

    RSS is cheap to read and is sampled every ``interval``; PSS makes the kernel walk every mapping
    (17 ms of CPU per sample for the CLI's ten processes, against 1.5 ms for RSS) and is sampled every
    ``pss_every`` RSS samples, so that measuring does not slow the measured: at 10 Hz PSS sampling alone
    took ~8 % of a 2-core machine from the mode with the most processes."""

    def __init__(self, root_pid: int, interval: float = 0.1, pss_every: int = 10):
        self.root_pid, self.interval, self.pss_every = root_pid, interval, pss_every
        self.peak, self.peak_rss, self._samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

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
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return pss, rss

    def _update(self, with_pss: bool = True):
        pss, rss = self._sample(with_pss)
        self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)

    def _run(self):
        while not self._stop.is_set():
            self._update(with_pss=self._samples % self.pss_every == 0)
            self._samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
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

    from imgtune_assets.core.fanout import run_trials

    start = time.perf_counter()
    with TreeMemory(os.getpid()) as mem:
        ids, images, targets = load_images(data_dir, scan_folder(data_dir, needs_target=True))
        outcomes = run_trials(trials, ids, images, targets, Objective(metric))
    wall = time.perf_counter() - start
    del images, targets
    assert ray.is_initialized()
    return {"wall": wall, "peak": mem.peak, "peak_rss": mem.peak_rss, "decodes_per_image": 1, "scores": [o.score for o in outcomes]}


# ----------------------------------------------------------------------------- the dagster CLI
def run_cli(work: Path, sweep_file: Path, keys: list[str], round_no: int) -> dict:
    """The CLI's own command lines (``imgtune_assets.cli.sweep_commands``): the manifest and settings
    first (not timed), then every trial as one ranged run, timed from launch to exit. Dagster's output
    goes to a log file, as with ``python -m imgtune_assets.cli sweep``."""
    env = dict(os.environ, **LOOPBACK_ENV)
    home = work / f"dagster_home_{round_no}"
    ensure_instance_config(home)  # a new home with the project's dagster.yaml, as a user's would get
    out_dir = work / f"out_{round_no}"
    env.update({"DAGSTER_HOME": str(home), "IMGTUNE_SWEEP": str(sweep_file), "IMGTUNE_OUTPUT_DIR": str(out_dir)})
    name = load_sweep(sweep_file).name  # the asset key prefix
    settings, trials_command, _report = sweep_commands(name, keys)
    log = work / f"dagster_{round_no}.log"

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
    n_images = len(load_images(data, scan_folder(data, needs_target=True))[0])
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
        parts = {k: statistics.median(s[k] for s in stats) for k in ("ray_start_seconds", "decode_seconds", "fanout_seconds")}
        walls = [r["wall"] for r in res["cli"]]
        startup = statistics.median(w - s["fanout_seconds"] - s["decode_seconds"] for w, s in zip(walls, stats))
        lines.append(f"cli breakdown (median): ray start {parts['ray_start_seconds']:.2f} s, decode "
                     f"{parts['decode_seconds']:.2f} s, fan-out {parts['fanout_seconds']:.2f} s, "
                     f"everything else (process + run start/finish, Ray start/stop) {startup:.2f} s")
        lines.append(f"fixed start-up (command launched → first trial submitted, median): "
                     f"{statistics.median(s['startup_seconds'] for s in stats):.2f} s")
    if res.get("fanout"):
        lines.append(f"fanout: Ray start (not in its wall) median {statistics.median(r['ray_start'] for r in res['fanout']):.2f} s")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    return f"{os.cpu_count()} CPU ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--data", help="a folder of images (images/ + targets/) instead of generated ones")
    parser.add_argument("--modes", default="cli,fanout,floor", help="comma-separated subset of cli,fanout,floor")
    parser.add_argument("--scaling", action="store_true", help="trials {16,64,256} × images {16,64}, one round each")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if "floor" in args.modes:  # the floor runs last in each round and is the reference
        args.modes = [m for m in args.modes if m != "floor"] + ["floor"]
    print(f"machine: {machine()}")
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
