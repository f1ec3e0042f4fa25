"""End to end through the real `dagster` CLI on a temporary DAGSTER_HOME: the whole sweep as one
ranged run, then one trial re-run; the instance then holds two materializations for that trial and
one for each of the others. The recorded best score is checked against scikit-image's PSNR.

Then ``python -m imgtune_assets.cli sweep``: one sweep, every sweep of a folder (``--all``), unknown
names; and, without Dagster, its command lines and what it prints."""

import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets import cli
from imgtune_assets.cli import (
    INVOCATION_TAG,
    StepDisplay,
    ensure_instance_config,
    error_summary,
    read_progress,
    resume_run_config,
    step_label,
    summary_lines,
    summary_score,
    sweep_commands,
    sweep_run_command,
)
from imgtune_assets.core.imageio import read_image
from imgtune_assets.core.launcher import RUN_PROCESS_TAG, process_gone
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env, sweeps_dir_env, write_sweep
from imgtune_assets_tests.support import wait_for

MODULE = ["-m", "imgtune_assets.definitions"]
KEYS = [f"trial-{k:03d}" for k in range(4)]
SEGMENT_PIPELINE = [
    {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 1, "high": 7}, "sigma": 0},
    {"op": "threshold", "method": {"type": "choice", "values": ["otsu", "mean"]}, "block_size": 31, "c": 0},
    {"op": "morphology", "operation": "open", "shape": "ellipse", "ksize": {"type": "int", "low": 1, "high": 5},
     "iterations": 1},
]
LOG_PATH = re.compile(r"Dagster's log: (\S+\.log)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(env, argv, timeout=300):
    result = subprocess.run(argv, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def run_cli(env, *args, timeout=600):
    return subprocess.run([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "sweep", *args], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the dagster CLI itself
def test_whole_sweep_then_one_trial_again(tmp_path, tiny_sweep, monkeypatch):
    env = cli_env(tmp_path, tiny_sweep)
    for command in sweep_commands("tiny", KEYS):
        run(env, command)
    run(env, [str(VENV_BIN / "dagster"), "asset", "materialize", *MODULE, "--select", "tiny/experiment_results",
              "--partition", "trial-002"])

    # The instance as a user's program finds it: through DAGSTER_HOME (the one the Makefile exports is
    # put back after the test).
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with DagsterInstance.get() as instance:
        records = instance.fetch_materializations(AssetKey(["tiny", "experiment_results"]), limit=100).records
        per_partition = {}
        for record in records:
            key = record.asset_materialization.partition
            per_partition[key] = per_partition.get(key, 0) + 1
        assert per_partition == {"trial-000": 1, "trial-001": 1, "trial-002": 2, "trial-003": 1}
        ranged_runs = {r.run_id for r in records if r.asset_materialization.partition != "trial-002"}
        assert len(ranged_runs) == 1  # the whole sweep was one run
        report = instance.fetch_materializations(AssetKey(["tiny", "sweep_report"]), limit=1).records[0]
        metadata = report.asset_materialization.metadata
        assert not instance.fetch_materializations(AssetKey("experiment_results"), limit=1).records

    best_trial = metadata["best_trial"].value
    best_score = metadata["best_score"].value
    assert metadata["completed_trials"].value == 4
    # Independent check: the best trial's pipeline re-applied, scored by scikit-image.
    trial = json.loads((tmp_path / "outputs" / "tiny" / "trials" / f"{best_trial}.json").read_text())
    data = (tiny_sweep.parent / yaml.safe_load(tiny_sweep.read_text())["data_dir"]).resolve()
    scores = []
    for image_file in sorted((data / "images").iterdir()):
        out = apply_pipeline(read_image(image_file), [tuple(s) for s in trial["stages"]])
        scores.append(peak_signal_noise_ratio(read_image(data / "targets" / image_file.name), out, data_range=255))
    assert best_score == pytest.approx(float(np.mean(scores)), rel=1e-9)
    best_pipeline = yaml.safe_load((tmp_path / "outputs" / "tiny" / "best_pipeline.yaml").read_text())
    assert [s["op"] for s in best_pipeline["pipeline"]] == ["bilateral_filter", "gaussian_blur"]
    assert all(not isinstance(v, dict) for s in best_pipeline["pipeline"] for v in s.values())


# ----------------------------------------------------------------------------- python -m imgtune_assets.cli sweep
def _log_files(output: str) -> list[Path]:
    return [Path(p) for p in LOG_PATH.findall(output)]


def _plain(path: Path) -> str:
    return ANSI.sub("", path.read_text())


@pytest.fixture
def ray_root():
    """A Ray temp dir of the test's own, for the commands it starts (``RAY_TMPDIR``: the embedded Ray's
    ``ray.init(address="local")`` makes its session folder in ``$RAY_TMPDIR/ray``), so that the session
    folders counted there are the test's whatever other Ray runs on the machine. Short, under /tmp: Ray's
    unix sockets live in it (paths of at most ~107 characters)."""
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _ray_sessions(root: Path) -> set[str]:
    """Ray's session folders under a Ray temp dir (``<root>/ray/session_<date>_<time>_<usec>_<pid>``)."""
    return {p.name for p in (root / "ray").glob("session_2*")}


def test_cli_sweep_command_prints_best_score(tmp_path, tiny_sweep, ray_root):
    env = cli_env(tmp_path, tiny_sweep, RAY_TMPDIR=str(ray_root))
    home_config = Path(env["DAGSTER_HOME"]) / "dagster.yaml"
    home_config.unlink()  # a DAGSTER_HOME the user just made: the command installs the project's dagster.yaml
    result = run_cli(env)  # IMGTUNE_SWEEP names one sweep: no name needed
    assert result.returncode == 0, result.stdout + result.stderr
    # One embedded Ray, started by the command itself (Ray names a session folder after the pid of the
    # process that started it) and connected to by the run; Dagster's resource initialization after
    # the run must not start another.
    started = [name.rsplit("_", 1)[1] for name in _ray_sessions(ray_root)]
    assert len(started) == 1, started
    [log] = _log_files(result.stdout)
    assert "Ray connected (embedded local, hosted by the imgtune command)" in _plain(log)
    assert f"installed the project's, {home_config}" in result.stdout
    assert home_config.read_text() == (PROJECT / "dagster.yaml").read_text()
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert type(instance.event_log_storage).__name__ == "BatchedSqliteEventLogStorage"
    report = json.loads((tmp_path / "outputs" / "tiny" / "report.json").read_text())
    assert f"best psnr: {report['best_score']:.4f} ({report['best_trial']})" in result.stdout
    assert f"report: {tmp_path / 'outputs' / 'tiny'}" in result.stdout
    assert "4/4 trials completed" in result.stdout
    # Dagster's own output is in the log file, not on the terminal.
    [log] = _log_files(result.stdout)
    assert log.parent == Path(env["DAGSTER_HOME"]) / "sweep_logs" and log.name.startswith("tiny-")
    assert " - DEBUG - " in _plain(log) and " - DEBUG - " not in result.stdout + result.stderr


def test_a_failed_tuned_images_step_still_points_at_the_report(tmp_path, denoise_data):
    """The winner's apply fails (its output folder's place is taken by a file) after the report was made:
    the command fails naming the step and why, and says where the report it made is."""
    (tmp_path / "taken").write_text("a file, not a folder\n")
    sweep = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=2,
                        apply={"input_dir": str(denoise_data / "images"), "output_dir": str(tmp_path / "taken" / "x")})
    result = run_cli(cli_env(tmp_path, sweep))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tiny/tuned_images" in result.stderr and "not a folder" in result.stderr, result.stderr
    assert (f"the report was made before the failure: {tmp_path / 'outputs' / 'tiny'} (leaderboard.csv"
            in result.stderr), result.stderr
    assert (tmp_path / "outputs" / "tiny" / "report.json").exists()


def test_cli_all_sweeps_of_a_folder(tmp_path, denoise_data, segment_data, ray_root):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    write_sweep(sweeps / "a-denoise.yaml", denoise_data, name="den-1", trials=4)
    write_sweep(sweeps / "b-segment.yaml", segment_data, name="seg.2", trials=4, metric="dice",
                pipeline=SEGMENT_PIPELINE)
    env = sweeps_dir_env(tmp_path, sweeps, RAY_TMPDIR=str(ray_root))
    result = run_cli(env, "--all")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # One Ray for the command's two runs, gone when the command has ended.
    [session] = _ray_sessions(ray_root)
    assert not [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
    lines = output.splitlines()
    assert len(lines) < 40, output
    for name, metric in (("den-1", "psnr"), ("seg.2", "dice")):
        report = json.loads((tmp_path / "outputs" / name / "report.json").read_text())
        assert report["completed_trials"] == 4
        shown = f"{report['best_score']:.6f}" if metric == "dice" else f"{report['best_score']:.4f}"
        assert f"best {metric}: {shown} ({report['best_trial']})" in result.stdout
        assert f"report: {tmp_path / 'outputs' / name}" in result.stdout
    # The sweeps ran in the order given by the folder, each with its own log of Dagster's DEBUG stream.
    assert result.stdout.index("den-1:") < result.stdout.index("seg.2:")
    logs = _log_files(result.stdout)
    assert [re.fullmatch(r"(.+)-\d{8}T\d{6}Z\.log", p.name).group(1) for p in logs] == ["den-1", "seg.2"]
    for log in logs:
        text = _plain(log)
        assert " - DEBUG - " in text and "RUN_SUCCESS" in text
        assert "Ray connected (embedded local, hosted by the imgtune command)" in text
    # A progress line of the trials, from progress.json (the last one at least: 4/4).
    assert re.search(r"manifest, trials, report \d/4 trials \(\d+%\)", result.stdout), result.stdout
    for name in ("den-1", "seg.2"):
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            partitions = instance.get_materialized_partitions(AssetKey([name, "experiment_results"]))
        assert partitions == set(KEYS)


def test_cli_all_runs_every_sweep_when_one_fails(tmp_path, denoise_data):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_sweep(sweeps / "a.yaml", empty, name="broken", trials=2)  # nothing to sweep: its manifest fails
    write_sweep(sweeps / "b.yaml", denoise_data, name="fine", trials=2)
    env = sweeps_dir_env(tmp_path, sweeps)
    result = run_cli(env, "--all")
    assert result.returncode != 0
    assert "failed: broken (exit " in result.stderr and "completed: fine" in result.stderr, result.stderr
    # Why, from the run's events: the failed step and its message, not Dagster's stack trace (in the log).
    assert re.search(rf"^    broken/image_manifest: {re.escape(str(empty))}: no image files", result.stderr,
                     re.M), result.stderr
    assert "Stack Trace" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    report = json.loads((tmp_path / "outputs" / "fine" / "report.json").read_text())
    assert report["completed_trials"] == 2 and f"report: {tmp_path / 'outputs' / 'fine'}" in result.stdout
    assert not (tmp_path / "outputs" / "broken" / "report.json").exists()


def test_cli_unknown_sweep_name_fails_naming_the_known_ones(tmp_path, denoise_data, segment_data):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    write_sweep(sweeps / "one.yaml", denoise_data, name="alpha")
    write_sweep(sweeps / "two.yaml", denoise_data, name="beta")
    env = sweeps_dir_env(tmp_path, sweeps)
    result = run_cli(env, "alpha", "gamma", timeout=120)
    assert result.returncode != 0
    assert "'gamma'" in result.stderr and "alpha, beta" in result.stderr
    assert not (tmp_path / "outputs" / "alpha").exists()  # nothing ran
    # Neither names nor --all, and two sweeps served: which one?
    result = run_cli(env, timeout=120)
    assert result.returncode != 0 and "alpha, beta" in result.stderr and "--all" in result.stderr
    assert not (Path(env["DAGSTER_HOME"]) / "sweep_logs").exists()  # no dagster command was started


def test_a_named_sweep_runs_though_another_teams_file_is_broken(tmp_path, denoise_data):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    write_sweep(sweeps / "alpha.yaml", denoise_data, name="alpha", trials=2)
    broken = write_sweep(sweeps / "beta.yaml", denoise_data, name="beta", trials=2)
    broken.write_text(broken.read_text().replace("trials: 2", "trails: 2"))
    env = sweeps_dir_env(tmp_path, sweeps)
    result = run_cli(env, "alpha", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"warning: the sweep files cannot be served together:\n{broken}: trails: unknown field" in result.stderr
    assert "running alpha from its own file (IMGTUNE_SWEEP)" in result.stderr
    assert json.loads((tmp_path / "outputs" / "alpha" / "report.json").read_text())["completed_trials"] == 2
    # The broken sweep itself, and --all, are refused, naming the file and field.
    for args in (("beta",), ("--all",)):
        refused = run_cli(env, *args, timeout=120)
        assert refused.returncode == 2 and f"error: {broken}: trails: unknown field" in refused.stderr, args
    assert not (tmp_path / "outputs" / "beta").exists()
    # A good file at fault in a conflict between good files is no other team's typo: refused, not run
    # alone (its tuned images would overwrite the originals alpha applies its winner to).
    photos = tmp_path / "photos"
    write_sweep(sweeps / "alpha.yaml", denoise_data, name="alpha", trials=2,
                apply={"input_dir": str(photos), "output_dir": str(tmp_path / "tuned")})
    gamma = write_sweep(sweeps / "gamma.yaml", denoise_data, name="gamma", trials=2,
                        apply={"input_dir": str(denoise_data), "output_dir": str(photos)})
    refused = run_cli(env, "gamma", timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"error: {broken}: trails: unknown field" in refused.stderr
    assert f"{gamma}: apply.output_dir {photos} is inside the apply.input_dir of {sweeps / 'alpha.yaml'}" \
        in refused.stderr, refused.stderr
    assert not (tmp_path / "outputs" / "gamma").exists() and not photos.exists()


def test_cli_sweep_resume_reuses_the_trials_a_partial_run_finished(tmp_path, tiny_sweep):
    env = cli_env(tmp_path, tiny_sweep)
    inputs, trials, _ = sweep_commands("tiny", KEYS[:2])  # a run that finished two of the four trials
    run(env, inputs)
    run(env, trials)
    trials_dir = tmp_path / "outputs" / "tiny" / "trials"
    before = {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("trial-*.json")}
    assert sorted(before) == ["trial-000.json", "trial-001.json"]
    result = run_cli(env, "tiny", "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reused 2 finished trial(s) (--resume)" in result.stdout, result.stdout
    assert "4/4 trials completed" in result.stdout
    [log] = _log_files(result.stdout)
    assert "reusing 2 finished trial(s) (skip_finished)" in _plain(log)
    # The finished trials were not computed again (their files untouched); the others were.
    after = {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("trial-*.json")}
    assert len(after) == 4 and all(after[name] == mtime for name, mtime in before.items())
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        [cli_run] = [r for r in instance.get_runs() if r.tags.get("imgtune/trigger") == "cli"]
        assert cli_run.run_config["ops"]["tiny__experiment_results"]["config"] == {"skip_finished": True}
    # Another seed: nothing saved is of this version; the command says so rather than nothing.
    tiny_sweep.write_text(tiny_sweep.read_text().replace("seed: 0\n", "seed: 1\n"))
    result = run_cli(env, "tiny", "--resume", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  reused no finished trial (--resume): none was saved whole for this version of the sweep file" in result.stdout


def test_cli_summary_warns_of_a_skipped_file(tmp_path, denoise_data):
    data = tmp_path / "data"
    shutil.copytree(denoise_data, data)
    (data / "images" / "notes.txt").write_text("not an image")
    images = len(list((data / "images").iterdir()))
    env = cli_env(tmp_path, write_sweep(tmp_path / "tiny.yaml", data, trials=2))
    result = run_cli(env, "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"  warning: 1 of {images} files skipped (see image_manifest's metadata or the run log)\n" \
        in result.stdout, result.stdout
    assert "does not beat the identity pipeline" not in result.stdout  # the demo's noise: tuning helps


def test_a_sweep_in_which_every_trial_failed_exits_3_after_its_report(tmp_path, segment_data):
    # A searched Sobel may draw dx = dy = 0 (the grid's first point), which OpenCV refuses on every image.
    pipeline = [{"op": "sobel", "dx": {"type": "int", "low": 0, "high": 1}, "dy": {"type": "int", "low": 0, "high": 1}},
                {"op": "threshold", "method": "otsu"}]
    env = cli_env(tmp_path, write_sweep(tmp_path / "f.yaml", segment_data, name="fails", trials=1, metric="dice",
                                        pipeline=pipeline, sampler="grid"))
    result = run_cli(env, "--quiet")
    assert result.returncode == 3, result.stdout + result.stderr
    out_dir = tmp_path / "outputs" / "fails"
    assert "0/1 trial completed (1 failed); no trial completed, no best dice" in result.stdout, result.stdout
    assert f"error: fails: no trial completed (1 failed): no tuned pipeline; each trial's error is in " \
           f"{out_dir / 'leaderboard.csv'}" in result.stderr, result.stderr
    assert json.loads((out_dir / "report.json").read_text())["completed_trials"] == 0


# ----------------------------------------------------------------------------- the CLI's parts, without Dagster
def test_sweep_commands_are_the_prefixed_dagster_commands():
    commands = sweep_commands("denoise-demo", [f"trial-{k:03d}" for k in range(32)])
    dagster = commands[0][0]
    assert Path(dagster).name == "dagster"
    base = [dagster, "asset", "materialize", "-m", "imgtune_assets.definitions"]
    assert commands == [
        [*base, "--select", "denoise-demo/image_manifest,denoise-demo/run_settings"],
        [*base, "--select", "denoise-demo/experiment_results", "--partition-range", "trial-000...trial-031"],
        [*base, "--select", "denoise-demo/sweep_report"],
    ]
    with pytest.raises(ValueError):
        sweep_commands("empty", [])
    tuned = sweep_commands("denoise-demo", ["trial-000"], apply=True)
    assert tuned[-1] == [*base, "--select", "denoise-demo/tuned_images"] and len(tuned) == 4


def test_the_cli_runs_a_sweep_as_one_run_of_its_job():
    command = sweep_run_command("denoise-demo", [f"trial-{k:03d}" for k in range(32)])
    assert command[1:7] == ["job", "execute", "-m", "imgtune_assets.definitions", "-j", "denoise_demo_sweep"]
    assert command[7] == "--tags" and json.loads(command[8]) == {
        "dagster/asset_partition_range_start": "trial-000", "dagster/asset_partition_range_end": "trial-031",
        "imgtune/trigger": "cli"}
    with pytest.raises(ValueError):
        sweep_run_command("empty", [])
    tagged = sweep_run_command("denoise-demo", ["trial-000"], invocation="abc")
    assert json.loads(tagged[8])[INVOCATION_TAG] == "abc" and len(tagged) == 9
    resumed = sweep_run_command("denoise-demo", ["trial-000"], config="/h/logs/x.resume.yaml")
    assert resumed[9:] == ["-c", "/h/logs/x.resume.yaml"]


def test_resume_run_config_sets_skip_finished_on_the_experiment_results_op():
    from imgtune_assets.defs.assets import ExperimentConfig
    from imgtune_assets.defs.keys import asset_key

    for name in ("denoise-demo", "seg.2", "plain_1"):
        op = asset_key(name, "experiment_results").to_python_identifier()  # Dagster's op name for the asset
        assert yaml.safe_load(resume_run_config(name)) == {"ops": {op: {"config": {"skip_finished": True}}}}
    assert "skip_finished" in ExperimentConfig.model_fields


def test_a_failed_step_is_named_by_its_asset_key():
    from imgtune_assets.defs.keys import asset_key

    for name in ("walk-s3nob", "seg.2", "plain_1"):
        for asset in ("image_manifest", "experiment_results"):
            step = asset_key(name, asset).to_python_identifier()  # Dagster's step key for the asset
            assert step_label(step, name) == f"{name}/{asset}"
        # an asset check's step: the asset's key, then the check's name
        check = asset_key(name, "sweep_report").to_python_identifier() + "_tuning_beats_identity"
        assert step_label(check, name) == f"{name}/sweep_report_tuning_beats_identity"
    assert step_label("other__thing") == "other/thing"


def test_the_sweep_job_through_dg_launch_with_a_range_and_without_one(tmp_path, tiny_sweep):
    env = cli_env(tmp_path, tiny_sweep)
    run(env, [str(VENV_BIN / "dg"), "launch", "--job", "tiny_sweep", "--partition-range", f"{KEYS[0]}...{KEYS[-1]}"])
    report = json.loads((Path(env["IMGTUNE_OUTPUT_DIR"]) / "tiny" / "report.json").read_text())
    assert report["completed_trials"] == report["total_trials"] == len(KEYS) and report["missing_trials"] == []
    # a launch that names no trials: refused, saying how to name them
    bare = subprocess.run([str(VENV_BIN / "dg"), "launch", "--job", "tiny_sweep"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0
    assert "partitioned by trial and this run names none" in bare.stdout + bare.stderr
    assert f"--partition-range '{KEYS[0]}...{KEYS[-1]}'" in bare.stdout + bare.stderr
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:  # refused at its first step, nothing made
        last = instance.get_runs(limit=1)[0]
        made = [e for e in instance.all_logs(last.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)]
        failed = [e.step_key for e in instance.all_logs(last.run_id, of_type=DagsterEventType.STEP_FAILURE)]
    assert made == [] and failed == ["tiny__image_manifest"], failed


REMOTE_TRACE = "  File \"/x/fanout.py\", line 90, in _decode_task\n    data = read(f)\n"


@pytest.mark.parametrize("message, expected", [
    ("KeyError: first\nsecond line\n", "KeyError: first\nsecond line"),
    ("ray.exceptions.RayTaskError(OSError): \x1b[36mray::imgtune:decode()\x1b[39m (pid=1, ip=127.0.0.1)\n"
     f"{REMOTE_TRACE}OSError: /data/images/a.png: disk unreadable\n", "OSError: /data/images/a.png: disk unreadable"),
    # imgtune's own errors: the message without the module path, from a Ray task's traceback too
    ("imgtune_assets.defs.resources.RayConnectError: cannot reach the Ray cluster at 127.0.0.1:1\n",
     "cannot reach the Ray cluster at 127.0.0.1:1"),
    ("ray.exceptions.RayTaskError(ImageDataError): ray::imgtune:decode() (pid=1, ip=127.0.0.1)\n"
     f"{REMOTE_TRACE}imgtune_assets.core.fanout.ImageDataError: /data/images/a.png: changed since the manifest\n",
     "/data/images/a.png: changed since the manifest"),
], ids=["two lines", "remote traceback", "own error", "own error, remote"])
def test_error_summary_is_the_innermost_message_without_a_remote_traceback(message, expected):
    from dagster._utils.error import SerializableErrorInfo  # (a test's fixture only: the type Dagster records)

    inner = SerializableErrorInfo(message, [], "X")
    wrapped = SerializableErrorInfo("DagsterExecutionStepExecutionError: step failed\n", [], "X", cause=inner)
    assert error_summary(inner) == error_summary(wrapped) == expected


def _snap(done, total=32, **extra):
    return {"done": done, "total": total, "failed": 0, "best": 20.0 + done / 10, "best_trial": f"trial-{done:03d}",
            "metric": "psnr", "evaluations_per_second": 50.0, "eta_seconds": 2.0 * (total - done),
            "elapsed_seconds": 1.0 * done, "finished": done == total, "updated_at": 1e9, **extra}


def test_progress_display_not_a_tty_prints_at_most_every_tenth():
    out = io.StringIO()
    display = StepDisplay("  [2/3] experiment_results", out, tty=False)
    display.update(0.5, None)
    for done in range(33):  # a report after every trial: far more often than every 10 %
        display.update(done, _snap(done))
        display.update(done, _snap(done))
    display.finish(33.0, _snap(32))
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 11, lines
    assert lines[0].startswith("  [2/3] experiment_results 0/32 trials (0%)"), lines  # the trials have started
    assert "\r" not in out.getvalue()
    assert lines[-1] == "  [2/3] experiment_results 32/32 trials (100%), best psnr 23.2 (trial-032), " \
                        "50.0 evaluations/s, done in 32 s"
    # Two bundled sweeps of 32 trials: header, 3 step lines (the trials' ≤ 10), 3 summary lines each, and
    # the one-off "installed dagster.yaml" line stay under the 40-line budget of `make demo`.
    assert 2 * (1 + 1 + len(lines) + 1 + 3) + 1 < 40


def test_progress_display_not_a_tty_says_the_run_is_alive_when_trials_are_slow():
    """No tenth reached for a minute (slow trials): a line all the same, then one a minute at most."""
    out = io.StringIO()
    display = StepDisplay("  [2/3] experiment_results", out, tty=False)
    for second in range(0, 200, 5):  # the run reports every 5 s; the first trial ends at 190 s
        display.update(float(second), _snap(0 if second < 190 else 1, total=60))
    lines = out.getvalue().splitlines()
    assert [line.split(" trials")[0] for line in lines] == ["  [2/3] experiment_results 0/60"] * 4, lines
    assert len(lines) == 1 + 3  # at 0 s, then 60, 120 and 180 s; trial 1 of 60 is no new tenth
    for second in range(200, 500, 5):  # the trials done, the report (or tuned images) still going: silent
        display.update(float(second), _snap(60, total=60))
    after = out.getvalue().splitlines()[len(lines):]
    assert len(after) == 1 and "60/60 trials (100%)" in after[0], after  # the last tenth: one line, then none


def test_progress_lines_show_a_score_bounded_by_one_with_six_decimals():
    out = io.StringIO()
    display = StepDisplay("  [2/3] experiment_results", out, tty=False)
    display.finish(33.0, _snap(32, metric="ssim", best=0.96112345))
    assert out.getvalue() == "  [2/3] experiment_results 32/32 trials (100%), best ssim 0.961123 (trial-032), " \
                             "50.0 evaluations/s, done in 32 s\n"


def test_progress_display_on_a_tty_redraws_one_line():
    out = io.StringIO()
    display = StepDisplay("  [2/3] experiment_results", out, tty=True, columns=60)
    display.update(1.0, None)
    for done in range(0, 33, 4):
        display.update(done, _snap(done))
    display.finish(33.0, _snap(32))
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") >= 9
    assert "[####################] 32/32" in text and "[##########----------] 16/32" in text
    *redrawn, final = text.split("\r")
    assert all(len(part) < 60 for part in redrawn)  # a line redrawn in place never wraps
    assert final.startswith("  [2/3] experiment_results 32/32 trials (100%)") and final.endswith("done in 32 s\n")


def test_progress_display_of_trials_that_finish_together_follows_the_image_evaluations():
    # A data set streamed chunk by chunk: no trial is done before the end, the images are half done.
    out = io.StringIO()
    display = StepDisplay("  [2/3] experiment_results", out, tty=True, columns=100)
    display.update(10.0, _snap(0, total=4, images=120, evaluations_done=240, evaluations_total=480))
    assert "[##########----------] 0/4 trials, 50% of image evaluations" in out.getvalue()
    printed = io.StringIO()
    display = StepDisplay("  [2/3] experiment_results", printed, tty=False)
    display.update(10.0, _snap(0, total=4, images=120, evaluations_done=240, evaluations_total=480))
    assert printed.getvalue().startswith("  [2/3] experiment_results 0/4 trials, 50% of image evaluations")


def test_read_progress_ignores_a_file_from_before_the_command(tmp_path):
    file = tmp_path / "progress.json"
    assert read_progress(file, since=0) is None
    file.write_text(json.dumps(_snap(4, updated_at=1000.0)))
    assert read_progress(file, since=999.0)["done"] == 4
    assert read_progress(file, since=1001.0) is None
    file.write_text(json.dumps(_snap(4, updated_at=1000.0, sweep="other")))
    assert read_progress(file, since=0, sweep_name="mine") is None
    assert read_progress(file, since=0, sweep_name="other")["done"] == 4
    file.write_text("{not json")
    assert read_progress(file, since=0) is None


def test_summary_lines():
    report = {"sweep": "s", "metric": "dice", "total_trials": 32, "completed_trials": 31, "failed_trials": ["trial-009"],
              "best_trial": "trial-017", "best_score": 0.912345, "identity_score": 0.5,
              "best_params": {"gaussian_blur.ksize": 5, "threshold.c": -2.345678}, "output_dir": "/o/s",
              "best_pipeline": "/o/s/best_pipeline.yaml"}
    assert summary_lines(report) == [
        "31/32 trials completed (1 failed); best dice: 0.912345 (trial-017); identity pipeline: 0.500000",
        "best parameters: gaussian_blur.ksize=5, threshold.c=-2.346",
        "report: /o/s (leaderboard.csv, per_image_scores.csv, best_pipeline.yaml, plots/)",
    ]
    none = summary_lines({**report, "completed_trials": 0, "best_trial": None, "best_score": float("nan"),
                          "best_params": None, "best_pipeline": None})
    assert "no trial completed" in none[0] and none[1] == "best parameters: none"
    assert none[2] == "report: /o/s (leaderboard.csv, per_image_scores.csv, plots/)"  # no best pipeline this time
    halved = summary_lines({**report, "completed_trials": 7, "pruned_trials": 24})
    assert halved[0].startswith("7/32 trials completed (1 failed, 24 pruned); best dice")
    single = summary_lines({**report, "total_trials": 1, "completed_trials": 1, "failed_trials": []})
    assert single[0].startswith("1/1 trial completed; best dice")
    noted = summary_lines({**report, "notes": ["early_stopping.min_images 50 is not below the 14 usable images"]})
    assert noted[3:] == ["note: early_stopping.min_images 50 is not below the 14 usable images"]


def test_summary_lines_of_a_fixed_pipeline_show_its_values():
    # A sweep that searches nothing (a best_pipeline.yaml run as a sweep): no best parameters to show,
    # the values that ran instead; a stage without values by its op, a repeated op by its index.
    report = {"sweep": "s-best", "metric": "psnr", "total_trials": 1, "completed_trials": 1, "best_trial": "trial-000",
              "best_score": 31.2, "best_params": {}, "output_dir": "/o/s-best",
              "fixed_pipeline": [{"op": "gaussian_blur", "ksize": 5, "sigma": 1.4431234}]}
    assert summary_lines(report)[:2] == [
        "1/1 trial completed; best psnr: 31.2000 (trial-000)",
        "fixed pipeline: gaussian_blur.ksize=5, gaussian_blur.sigma=1.443",
    ]
    stages = [{"op": "to_gray"}, {"op": "median_blur", "ksize": 3}, {"op": "median_blur", "ksize": 5}]
    assert summary_lines({**report, "fixed_pipeline": stages, "completed_trials": 0, "best_trial": None})[1] == \
        "fixed pipeline: to_gray, median_blur[1].ksize=3, median_blur[2].ksize=5"
    # a report.json from before fixed_pipeline, or of a sweep that searches: as it was
    assert summary_lines({**report, "fixed_pipeline": None})[1] == "best parameters: none"


def test_summary_lines_warn_of_skipped_files_and_of_no_improvement():
    report = {"sweep": "s", "metric": "ssim", "higher_is_better": True, "total_trials": 4, "completed_trials": 4,
              "best_trial": "trial-002", "best_score": 0.26271, "identity_score": 0.33044, "best_params": {"a": 1},
              "output_dir": "/o/s", "best_pipeline": "/o/s/best_pipeline.yaml", "manifest_digest": "d1"}
    rows = [{"status": "ok"}] * 23 + [{"status": "skipped"}] * 7
    lines = summary_lines(report, {"manifest_digest": "d1", "images": rows})
    assert lines[3:] == [
        "warning: 7 of 30 files skipped (see image_manifest's metadata or the run log)",
        "warning: the best pipeline does not beat the identity pipeline (ssim 0.262710 vs 0.330440): "
        "best_pipeline.yaml is the best tried, not an improvement",
    ]
    # Settings of other images (a newer manifest) are not this report's: no count from them.
    assert not any("skipped" in line for line in summary_lines(report, {"manifest_digest": "d2", "images": rows}))
    # Lower is better (mae): a lower best score beats the identity pipeline; an equal one does not.
    mae = {**report, "metric": "mae", "higher_is_better": False}
    assert not any(line.startswith("warning") for line in summary_lines({**mae, "best_score": 0.01,
                                                                         "identity_score": 0.02}))
    assert summary_lines({**mae, "best_score": 0.02, "identity_score": 0.02})[-1].startswith(
        "warning: the best pipeline does not beat the identity pipeline (mae 0.020000 vs 0.020000)")


def test_summary_scores_keep_four_significant_digits_when_small():
    assert summary_score(31.41592) == "31.4159" and summary_score(0.912345) == "0.9123"  # as before
    assert summary_score(0.5) == "0.5000" and summary_score(0.0) == "0.0000" and summary_score(100.0) == "100.0000"
    assert summary_score(0.000234567) == "0.0002346" and summary_score(-0.0123456) == "-0.01235"
    assert summary_score(2.5e-6) == "2.500e-06"
    line = summary_lines({"metric": "mae", "higher_is_better": False, "total_trials": 2, "completed_trials": 2,
                          "best_trial": "trial-001", "best_score": 0.000234567, "identity_score": 0.0123456})[0]
    assert line.endswith("best mae: 0.0002346 (trial-001); identity pipeline: 0.012346")


def test_summary_scores_of_metrics_bounded_by_one_have_six_decimals():
    # SSIM and Dice: good trials differ in the 4th-5th decimal
    assert summary_score(0.96112345, "ssim") == "0.961123" and summary_score(0.9611, "dice") == "0.961100"
    assert summary_score(1.0, "iou") == "1.000000" and summary_score(0.0, "edge_f1") == "0.000000"
    assert summary_score(-0.25, "ssim") == "-0.250000"
    assert summary_score(0.0123456, "mae") == "0.012346" and summary_score(0.000234567, "mae") == "0.0002346"
    # the others keep theirs
    assert summary_score(31.41592, "psnr") == "31.4159" and summary_score(0.000234567, "sharpness") == "0.0002346"
    line = summary_lines({"metric": "ssim", "total_trials": 2, "completed_trials": 2, "best_trial": "trial-001",
                          "best_score": 0.96112345, "identity_score": 0.9610987})[0]
    assert line.endswith("best ssim: 0.961123 (trial-001); identity pipeline: 0.961099")


def test_log_file_path_is_per_sweep_and_utc(tmp_path):
    from datetime import datetime, timedelta, timezone

    when = datetime(2026, 11, 30, 23, 5, 9, tzinfo=timezone(timedelta(hours=2)))
    assert cli.log_file_path(tmp_path, "denoise-demo", when) == tmp_path / "sweep_logs" / "denoise-demo-20261130T210509Z.log"


def test_sweep_logs_an_earlier_version_left_in_the_telemetry_folder_are_moved(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("denoise-demo-20261130T210509Z.log", "denoise-demo-20261130T210509Z.resume.yaml", "event.log"):
        (logs / name).write_text(name)
    assert cli.move_old_sweep_logs(tmp_path) == 2
    assert sorted(p.name for p in logs.iterdir()) == ["event.log"]  # Dagster's own: left alone
    assert sorted(p.name for p in (tmp_path / "sweep_logs").iterdir()) == [
        "denoise-demo-20261130T210509Z.log", "denoise-demo-20261130T210509Z.resume.yaml"]
    assert cli.move_old_sweep_logs(tmp_path) == 0 and cli.move_old_sweep_logs(tmp_path / "new home") == 0


def test_a_killed_commands_ray_host_folder_is_removed_by_the_next_and_a_running_ones_kept(tmp_path):
    ended = subprocess.Popen(["sleep", "60"])
    killed_tag = cli.process_tag(ended.pid)  # (taken while it runs: its start time is part of it)
    ended.kill()
    ended.wait()
    owners = {"killed": killed_tag, "running": cli.process_tag(),
              "another machine": json.dumps({**json.loads(killed_tag), "host": "elsewhere"})}
    folders = {}
    for name, owner in owners.items():
        folders[name] = tmp_path / f"{cli.RAY_HOST_FOLDER_PREFIX}{name.replace(' ', '_')}"
        folders[name].mkdir()
        (folders[name] / cli.RAY_HOST_OWNER_FILE).write_text(owner)
    older_version = tmp_path / f"{cli.RAY_HOST_FOLDER_PREFIX}ghi789"  # no owner recorded
    older_version.mkdir()
    assert cli.remove_killed_ray_host_folders(tmp_path) == [folders["killed"]]
    assert not folders["killed"].exists() and folders["running"].is_dir() and folders["another machine"].is_dir()
    assert older_version.is_dir()


def test_sweep_logs_stay_out_of_dagsters_telemetry_queue(tmp_path, monkeypatch):
    """Dagster's daemon and webserver post the files of this folder to Dagster's telemetry server,
    telemetry enabled or not (dagster._core.telemetry_upload): a sweep's log (paths, image names,
    errors) must never land there."""
    from dagster_shared.telemetry import get_or_create_dir_from_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    uploaded = Path(get_or_create_dir_from_dagster_home("logs")).resolve()
    log = cli.log_file_path(tmp_path, "denoise-demo").resolve()
    assert uploaded != log.parent and uploaded not in log.parents


def test_cli_refuses_without_dagster_home_or_with_names_and_all(tmp_path, tiny_sweep, monkeypatch, capsys):
    monkeypatch.setenv("IMGTUNE_SWEEP", str(tiny_sweep))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert cli.main(["sweep"]) == 2
    assert "DAGSTER_HOME" in capsys.readouterr().err
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli.main(["sweep", "tiny", "--all"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_an_existing_instance_config_is_left_alone(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    assert ensure_instance_config(tmp_path) is None
    assert cli.instance_config_note(tmp_path) is None
    assert (tmp_path / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"
    assert ensure_instance_config(tmp_path / "fresh") == tmp_path / "fresh" / "dagster.yaml"
    used = tmp_path / "used"  # a home that `dg` or `dagster` used first: left alone, and the user told how
    (used / "history").mkdir(parents=True)
    note = cli.instance_config_note(used)
    assert note.startswith(f"(no dagster.yaml in DAGSTER_HOME {used}, which already holds files")
    assert f"cp {cli.PROJECT_DAGSTER_YAML} {used}/" in note and not (used / "dagster.yaml").exists()


def _slow_sweep_under_way(tmp_path, trials, **extra_env):
    """``python -m imgtune_assets.cli sweep`` of a slow sweep, once its first trial is done:
    (its environment, the command's process, the processes it has started by then). ``extra_env`` is
    added to the command's environment."""
    import time

    from imgtune_assets.core.demo_data import make_denoise_set

    data = tmp_path / "data"
    make_denoise_set(data, count=8, size=384)
    sweep = write_sweep(tmp_path / "slow.yaml", data, name="slow", trials=trials, pipeline=[
        {"op": "bilateral_filter", "d": {"type": "int", "low": 15, "high": 25}, "sigma_color": 75, "sigma_space": 75}])
    env = cli_env(tmp_path, sweep, **extra_env)
    progress = tmp_path / "outputs" / "slow" / "progress.json"
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "sweep", "--quiet"], cwd=PROJECT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and json.loads(progress.read_text()).get("done", 0) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        return env, proc, [p for p in psutil.Process(proc.pid).children(recursive=True) if p.is_running()]
    except BaseException:
        proc.kill()
        raise


def test_cli_sigterm_interrupts_the_run_and_stops_the_commands_ray(tmp_path, ray_root):
    """A job scheduler's SIGTERM (or `kill`) to the command alone: the command passes the interruption
    on to its run, which fails cleanly with the trials it had finished saved, stops its Ray, and exits
    with 130; nothing of either is left running."""
    import signal

    env, proc, started = _slow_sweep_under_way(tmp_path, trials=400, RAY_TMPDIR=str(ray_root))
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "failed: slow (exit 130)" in err, err
    # how to go on, with the variable that chose the sweep file: run as printed, it finds the same sweep
    assert f"`IMGTUNE_SWEEP={env['IMGTUNE_SWEEP']} " in err and "python -m imgtune_assets.cli sweep slow --resume` resumes" in err, err
    assert "SIGTERM received" not in err, err  # Ray's crash handler (a stack dump) did not take the signal
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not alive, [p.cmdline() for p in alive]  # the run, Ray's processes
    [session] = _ray_sessions(ray_root)
    assert not [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        [run] = instance.get_runs()
        assert run.is_finished and not run.is_success, run.status
        done = instance.get_materialized_partitions(AssetKey(["slow", "experiment_results"]))
    saved = {p.stem for p in (tmp_path / "outputs" / "slow" / "trials").glob("trial-*.json")}
    assert saved and len(saved) < 400 and done <= saved  # finished trials kept for skip_finished


@pytest.mark.parametrize("killed", ["run process", "command"])
def test_a_run_whose_process_or_command_is_killed_is_marked_failed(tmp_path, killed):
    """SIGKILL (as the OOM killer sends it) to the run's `dagster job execute` process: the command,
    which sees it die, marks its run failed; to the command itself: the run process, tied to it, fails
    its run and exits. Either way no run shows as running for ever (which would hold the sweep's
    new-images sensor for ever) and no process is left working."""
    import signal

    env, proc, started = _slow_sweep_under_way(tmp_path, trials=40)
    try:
        command = psutil.Process(proc.pid)
        names = [p.name() for p in started]
        [run_process] = [p for p in command.children() if "job" in p.cmdline() and "execute" in p.cmdline()]
        (run_process if killed == "run process" else command).send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if killed == "run process":
        assert proc.returncode == 128 + signal.SIGKILL, out + err  # as a shell reports a killed command
        assert "the run's process ended (killed by SIGKILL) before the run did" in err, err
        assert "error: slow: manifest, trials, report failed (killed by SIGKILL)\n" in err and "--tags" not in err, err
        hint = re.search(r"finished trials are kept: `IMGTUNE_SWEEP=(\S+) IMGTUNE_OUTPUT_DIR=(\S+) (\S+) -m "
                         r"imgtune_assets.cli sweep slow --resume` resumes\n", err)
        assert hint and hint.groups()[:2] == (env["IMGTUNE_SWEEP"], env["IMGTUNE_OUTPUT_DIR"]), err
        # the interpreter it names is the one imgtune runs on, as typed in the command's folder
        shown = hint.group(3)
        resolved = shutil.which(shown, path=env.get("PATH")) if shown == "python" else str(PROJECT / shown)
        assert Path(resolved).absolute() == (VENV_BIN / "python").absolute(), (shown, resolved)
        assert err.rstrip().endswith("failed: slow (exit 137)"), err
    else:
        assert proc.returncode == -signal.SIGKILL
    # The run process and Ray's own (GCS, raylet, workers) end with the command. (Ray's two agents, whose
    # raylet was killed under them, give up on their own a minute later: Ray's GCS timeout.)
    agents = [p for p, name in zip(started, names) if name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")]
    _, alive = psutil.wait_procs([p for p in started if p not in agents], timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    for agent in agents if killed == "command" else []:
        agent.kill()
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        [run] = instance.get_runs()
        assert process_gone(run.tags[RUN_PROCESS_TAG])  # the run process had been tied to the command
        if killed == "command":
            # Interrupted as it began to fail the run, the run process is usually ended by its Ray (whose
            # raylet died with the command) before it can record the run's end: the command's run watch,
            # in a session of its own, records it once the run process is gone — with no other command.
            wait_for(lambda: instance.get_run_by_id(run.run_id).is_finished, 60, what="the run marked finished")
            run = instance.get_run_by_id(run.run_id)
            failures = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_FAILURE).records
            assert len(failures) == 1, failures  # one end: the run process's own or the watch's
            message = failures[0].event_log_entry.message
            assert "the imgtune sweep command that launched it was killed" in message or "interrupt" in message.lower(), message
        assert run.is_finished and not run.is_success, run.status
