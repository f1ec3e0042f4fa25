"""``python -m imgtune_assets.cli apply PIPELINE INPUT OUTPUT``, the real command in a subprocess with an
embedded Ray on loopback: a folder tuned (and a re-run that writes nothing), a pipeline that still
searches, a missing input folder, and a cluster address where no Ray runs."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from imgtune_assets.core.apply import LEDGER_NAME
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets_tests.conftest import VENV_BIN, cli_env, free_port, write_sweep
from imgtune_assets_tests.support.files import SLOW_STAGES, age, slow_folder, wait_for_outputs
from imgtune_assets_tests.support.processes import ended_after
from imgtune_assets_tests.support.waiting import wait_for

STAGES = [("gaussian_blur", {"ksize": 5, "sigma": 1.5}), ("median_blur", {"ksize": 3})]
LOSSLESS = ("grey8.png", "scan16.tif")
IMAGES = (*LOSSLESS, "photo.jpg")


def apply_cli(env, cwd, *args, timeout=240):
    return subprocess.run([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "apply", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def environment(tmp_path, pipeline):
    env = cli_env(tmp_path, pipeline)
    env.pop("IMGTUNE_RAY_ADDRESS", None)  # the embedded Ray, on 127.0.0.1
    env.pop("RAY_AUTH_MODE", None)  # Ray's default: token authentication
    return env


def best_pipeline(tmp_path, stages=STAGES, name="best"):
    """A best_pipeline.yaml as a sweep report writes it: every parameter fixed, one trial."""
    return write_sweep(tmp_path / f"{name}.yaml", tmp_path / "data", name=name, trials=1,
                       pipeline=[{"op": op, **params} for op, params in stages])


def photos(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    grey = np.clip(np.add.outer(np.arange(40), np.arange(50)) * 2 + rng.normal(0, 20, (40, 50)), 0, 255)
    cv2.imwrite(str(folder / "grey8.png"), grey.astype(np.uint8))
    cv2.imwrite(str(folder / "scan16.tif"), rng.integers(0, 65535, (30, 36, 3), dtype=np.uint16))
    cv2.imwrite(str(folder / "photo.jpg"), rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def decode(path):
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)


def test_apply_a_pipeline_to_a_folder_then_again(tmp_path):
    pipeline = best_pipeline(tmp_path)
    source, target = photos(tmp_path / "in put"), tmp_path / "out"
    env = environment(tmp_path, pipeline)
    result = apply_cli(env, tmp_path, pipeline, source, target)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    summary = re.compile(rf"^3 written, 0 unchanged, 1 skipped in [0-9.]+s -> {re.escape(str(target))} "
                         rf"\(ledger {re.escape(str(target / LEDGER_NAME))}\)$", re.M)
    assert summary.search(result.stdout), result.stdout
    assert f"skipped: {source / 'notes.txt'}: not an image file type" in result.stderr, result.stderr
    assert "Token authentication is enabled" not in result.stderr, result.stderr  # (Ray's default, not news)

    assert sorted(p.name for p in target.iterdir()) == sorted([*IMAGES, LEDGER_NAME])
    for name in IMAGES:
        original, written = decode(source / name), decode(target / name)
        assert written.dtype == original.dtype and written.shape == original.shape, name
        if name in LOSSLESS:
            assert np.array_equal(written, apply_pipeline(original, STAGES)), name
    photo = decode(target / "photo.jpg").astype(int) - apply_pipeline(decode(source / "photo.jpg"), STAGES)
    assert np.abs(photo).mean() < 3.0
    ledger = json.loads((target / LEDGER_NAME).read_text())
    assert {e["output"]: e["output_sha256"] for e in ledger["entries"]} == {
        str(target / n): hashlib.sha256((target / n).read_bytes()).hexdigest() for n in IMAGES}

    # Again, naming the same folders relative to the working folder: nothing to write.
    for name in IMAGES:  # older than the racy window: the outputs' stats are recorded once read back
        age(source / name)
        age(target / name)
    stamps = {n: (target / n).stat().st_mtime_ns for n in IMAGES}
    again = apply_cli(env, tmp_path, pipeline.name, "in put", "./out")
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-6000:]}"
    assert re.search(r"^0 written, 3 unchanged, 1 skipped in ", again.stdout, re.M), again.stdout
    assert {n: (target / n).stat().st_mtime_ns for n in IMAGES} == stamps

    # And a third time: decided from the files' stats alone, so no Ray is started.
    ray_root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        third = apply_cli({**env, "RAY_TMPDIR": str(ray_root)}, tmp_path, pipeline, source, target)
        assert list(ray_root.iterdir()) == []
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    assert third.returncode == 0, f"{third.stdout[-3000:]}\n{third.stderr[-6000:]}"
    assert re.search(r"^0 written, 3 unchanged, 1 skipped in ", third.stdout, re.M), third.stdout


def test_a_folder_of_which_no_image_can_be_processed_fails_the_command(tmp_path):
    """Every image skipped (here: none decodes) is a failure a script must see: exit 1, the reasons
    and the ledger all the same; one usable image among them is a success with skips (a broken
    symbolic link included: no re-run reads it, so it is not a passing failure, exit 4)."""
    pipeline = best_pipeline(tmp_path)
    env = environment(tmp_path, pipeline)
    source = tmp_path / "broken"
    source.mkdir()
    for name in ("a.png", "b.jpg"):
        (source / name).write_bytes(b"not an image at all")
    (source / "notes.txt").write_text("not an image\n")
    (source / "link.png").symlink_to(tmp_path / "moved-away.png")
    result = apply_cli(env, tmp_path, pipeline, source, tmp_path / "out")
    assert result.returncode == 1, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert re.search(r"^0 written, 0 unchanged, 4 skipped in ", result.stdout, re.M), result.stdout
    assert f"error: none of the 3 images of {source} could be processed" in result.stderr, result.stderr
    assert f"skipped: {source / 'a.png'}: not a decodable image" in result.stderr, result.stderr
    assert f"skipped: {source / 'link.png'}: a broken symbolic link" in result.stderr, result.stderr
    assert (tmp_path / "out" / LEDGER_NAME).exists()
    cv2.imwrite(str(source / "c.png"), np.full((8, 8), 90, np.uint8))
    fine = apply_cli(env, tmp_path, pipeline, source, tmp_path / "out")
    assert fine.returncode == 0 and re.search(r"^1 written, 0 unchanged, 4 skipped in ", fine.stdout, re.M), \
        f"{fine.stdout[-3000:]}\n{fine.stderr[-3000:]}"


def two_photos(tmp_path: Path):
    """(pipeline, environment, a folder of two small photos, the output folder)."""
    pipeline = best_pipeline(tmp_path)
    source = tmp_path / "photos"
    source.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(source / name), np.full((8, 8), 90, np.uint8))
    return pipeline, environment(tmp_path, pipeline), source, tmp_path / "out"


def test_an_output_that_could_not_be_written_fails_the_command_until_a_re_run_writes_it(tmp_path):
    """Not the image's fault (a full disk, a lost connection; here a folder where the output goes): exit 4,
    so that a script runs the command again, which writes it."""
    pipeline, env, source, out = two_photos(tmp_path)
    (out / "b.png").mkdir(parents=True)  # in the way of b's output
    result = apply_cli(env, tmp_path, pipeline, source, out)
    assert result.returncode == 4, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert re.search(r"^1 written, 0 unchanged, 1 skipped in ", result.stdout, re.M), result.stdout
    assert "error: 1 image could not be read or written (the reasons are above), not for their content: run the " \
           "same command again to do them" in result.stderr, result.stderr
    (out / "b.png").rmdir()
    again = apply_cli(env, tmp_path, pipeline, source, out)
    assert again.returncode == 0 and re.search(r"^1 written, 1 unchanged, 0 skipped in ", again.stdout, re.M), \
        f"{again.stdout[-3000:]}\n{again.stderr[-3000:]}"


def test_a_ledger_that_could_not_be_written_is_a_passing_failure_with_the_outputs_listed(tmp_path):
    """The outputs were written but their ledger was not (the store lost, write access refused; here a
    folder where the ledger goes): exit 4 with what was done printed, not exit 1 as if nothing was."""
    pipeline, env, source, out = two_photos(tmp_path)
    (out / LEDGER_NAME / "in-the-way").mkdir(parents=True)
    result = apply_cli(env, tmp_path, pipeline, source, out)
    assert result.returncode == 4, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert re.search(r"^2 written, 0 unchanged, 0 skipped in .*\(ledger not written\)$", result.stdout, re.M), \
        result.stdout
    assert f"error: {out / LEDGER_NAME}" in result.stderr and "the outputs written stand" in result.stderr, \
        result.stderr
    assert (out / "a.png").is_file() and (out / "b.png").is_file()


def test_a_sweeps_data_folder_is_read_from_its_images_and_a_folder_without_images_is_named(tmp_path):
    pipeline = best_pipeline(tmp_path)
    env = environment(tmp_path, pipeline)
    data = tmp_path / "data"
    photos(data / "images")
    (data / "targets").mkdir()
    cv2.imwrite(str(data / "targets" / "grey8.png"), np.zeros((40, 50), np.uint8))
    (data / "README.txt").write_text("where these photos came from\n")
    result = apply_cli(env, tmp_path, pipeline, data, tmp_path / "tuned")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert re.search(r"^3 written, 0 unchanged, 1 skipped in ", result.stdout, re.M), result.stdout
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == sorted([*IMAGES, LEDGER_NAME])
    assert "warning: no image files" not in result.stderr

    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here\n")
    nothing = apply_cli(env, tmp_path, pipeline, empty, tmp_path / "out")
    assert nothing.returncode == 0, nothing.stderr[-3000:]
    assert f"warning: no image files in {empty} (.png, .jpg" in nothing.stderr, nothing.stderr


def test_a_pipeline_that_still_searches_is_refused(tmp_path):
    searching = write_sweep(tmp_path / "sweep.yaml", tmp_path / "data", trials=4)  # the default search space
    source = photos(tmp_path / "in")
    # Where an embedded Ray would make its session folder: a refused pipeline starts no Ray at all.
    ray_root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    env = {**environment(tmp_path, searching), "RAY_TMPDIR": str(ray_root)}
    try:
        result = apply_cli(env, tmp_path, searching, source, tmp_path / "out")
        assert list(ray_root.iterdir()) == []
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {searching}: pipeline[0] (bilateral_filter) still searches d, sigma_color" in result.stderr
    assert "best_pipeline.yaml" in result.stderr
    assert not (tmp_path / "out").exists()

    # an invalid pipeline file: the sweep file's own error, exit 2 too
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**yaml.safe_load(best_pipeline(tmp_path).read_text()),
                                      "pipeline": [{"op": "gaussian_blur", "ksize": 4}]}))
    result = apply_cli(environment(tmp_path, broken), tmp_path, broken, source, tmp_path / "out")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {broken}: pipeline[0].ksize" in result.stderr and "odd" in result.stderr


def test_a_pipeline_file_named_by_a_url_is_refused_naming_it(tmp_path):
    pipeline = best_pipeline(tmp_path)
    result = apply_cli(environment(tmp_path, pipeline), tmp_path, "s3://photos/best_pipeline.yaml",
                       photos(tmp_path / "in"), tmp_path / "out")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: s3://photos/best_pipeline.yaml: the pipeline file is read from this "
                                    "machine's disk"), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_input_folder(tmp_path):
    pipeline = best_pipeline(tmp_path)
    missing = tmp_path / "no such photos"
    result = apply_cli(environment(tmp_path, pipeline), tmp_path, pipeline, missing, tmp_path / "out")
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"error: {missing}: input folder does not exist" in result.stderr, result.stderr
    assert " written, " not in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_cluster_address_where_no_ray_runs_fails_soon_naming_it(tmp_path):
    pipeline = best_pipeline(tmp_path)
    source = photos(tmp_path / "in")
    address = f"127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there
    started = time.monotonic()
    # (before the fix Ray retried for many minutes: the timeout here fails the test instead)
    result = apply_cli(environment(tmp_path, pipeline), tmp_path, pipeline, source, tmp_path / "out",
                       "--ray-address", address, timeout=180)
    assert result.returncode != 0, result.stdout + result.stderr
    # The command's start and a 10 s probe: a minute and a half is generous for a busy machine, and far
    # short of Ray's own retries.
    assert time.monotonic() - started < 90
    assert f"error: cannot reach the Ray cluster at {address}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert " written, " not in result.stdout


def test_a_cluster_that_stops_mid_apply_is_said_and_leaves_its_ledger(tmp_path):
    """The cluster's head stopped under a running apply: Ray's own client would wait 60 s for its GCS and
    then end the process from C++, leaving no ledger, or a task's error would end it with a traceback.
    The command says what happened, exits 1 well before that, and its ledger lists the outputs written,
    so a re-run (embedded Ray) does the rest."""
    from imgtune_assets_tests.support.raycluster import start_ray_cluster

    pipeline = best_pipeline(tmp_path, SLOW_STAGES)
    src, out = tmp_path / "in", tmp_path / "out"
    names = slow_folder(src)
    cluster = start_ray_cluster(tmp_path / "cluster", nodes=1, num_cpus=2)
    env = {**environment(tmp_path, pipeline), **cluster.env}
    try:
        proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "apply", str(pipeline),
                                 str(src), str(out), "--ray-address", cluster.address], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        # once the first tasks (of 5 and 4 files) are back
        stdout, stderr, seconds = ended_after(proc, lambda: wait_for_outputs(proc, out, count=12), cluster.stop)
    finally:
        cluster.stop()
    assert proc.returncode == 1, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    print(f"\nthe cluster's stop detected and the command ended in {seconds:.1f}s")
    assert seconds < 50, stderr[-3000:]  # before Ray's own 60 s end
    # (whichever Ray shows first: its GCS refusing connections, or the raylet's death on a task)
    assert re.search(rf"error: (the Ray cluster stopped answering: its GCS at {re.escape(cluster.address)} has "
                     r"refused connections for \d+ s|the Ray node died during the apply command: )", stderr), \
        stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"the ledger {out / LEDGER_NAME} lists the outputs written" in stderr, stderr[-3000:]
    listed = json.loads((out / LEDGER_NAME).read_text())["entries"]
    assert listed and all((out / Path(e["output"]).name).exists() for e in listed)
    again = apply_cli(environment(tmp_path, pipeline), tmp_path, pipeline, src, out)
    assert again.returncode == 0, again.stderr[-3000:]
    written = int(re.search(r"^(\d+) written, (\d+) unchanged", again.stdout, re.M).group(1))
    assert written == len(names) - len(listed), again.stdout


def test_sigterm_stops_the_command_keeping_what_it_wrote_and_a_re_run_goes_on(tmp_path):
    """SIGTERM once a dozen outputs are there (Ray's tasks under way), and again while it cleans up: the
    command ends as interrupted (130), every output the ledger lists is there, whole and right, no
    temporary file is left, and the same command run again completes the folder, rewriting nothing listed."""
    pipeline = best_pipeline(tmp_path, SLOW_STAGES)
    src, out = tmp_path / "in", tmp_path / "out"
    names = slow_folder(src)
    env = environment(tmp_path, pipeline)
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "apply", str(pipeline), str(src),
                             str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for_outputs(proc, out)
        proc.send_signal(15)
        deadline = time.monotonic() + 120
        while not (out / LEDGER_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(15)  # a second one, while the command stops its Ray: held
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr and str(out / LEDGER_NAME) in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not list(out.glob(".*.tmp"))  # a stopped task's half-written output: removed with its Ray
    listed = {Path(e["output"]).name: e for e in json.loads((out / LEDGER_NAME).read_text())["entries"]}
    assert set(listed) < set(names)  # not all (a task that had not returned is not listed)
    for name, entry in listed.items():
        assert entry["status"] == "written"
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["output_sha256"]

    again = apply_cli(env, tmp_path, pipeline, src, out)
    assert again.returncode == 0, again.stderr
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (written|unchanged|skipped)", again.stdout))
    assert counts["unchanged"] == len(listed) and counts["written"] == len(names) - len(listed), again.stdout
    for name in names:
        assert np.array_equal(decode(out / name), apply_pipeline(decode(src / name), SLOW_STAGES)), name
    assert not list(out.glob(".*.tmp"))


def test_a_command_killed_outright_keeps_the_ledger_of_what_it_wrote_until_seconds_before(tmp_path):
    """SIGKILL (the OOM killer, `kill -9`): no clean-up runs, but the ledger written as the tasks come
    back lists what was written until then; each listed output is there and right, and the same command
    run again rewrites none of them."""
    import signal

    pipeline = best_pipeline(tmp_path, SLOW_STAGES)
    src, out = tmp_path / "in", tmp_path / "out"
    names = slow_folder(src, count=max(120, 40 * (os.cpu_count() or 1)))  # more than before the first checkpoint
    env = environment(tmp_path, pipeline)
    # a session of its own: what the command started (its Ray) is ended with its group afterwards
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "apply", str(pipeline), str(src),
                             str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def checkpointed() -> bool:
            assert proc.poll() is None, f"the command ended before it could be killed: {proc.stderr.read()}"
            return (out / LEDGER_NAME).exists()

        wait_for(checkpointed, 180, interval=0.02, what="the ledger written while the tasks run")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    listed = {Path(e["output"]).name: e for e in json.loads((out / LEDGER_NAME).read_text())["entries"]}
    assert listed and set(listed) < set(names)
    for name, entry in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["output_sha256"], name

    again = apply_cli(env, tmp_path, pipeline, src, out)
    assert again.returncode == 0, again.stderr
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (written|unchanged|skipped)", again.stdout))
    # (outputs that Ray's workers finished after the kill, unlisted, are written again)
    assert counts["unchanged"] >= len(listed) and counts["written"] == len(names) - counts["unchanged"], again.stdout
    for name in names:
        assert np.array_equal(decode(out / name), apply_pipeline(decode(src / name), SLOW_STAGES)), name


def test_an_embedded_ray_that_cannot_start_is_named_without_a_traceback(tmp_path):
    pipeline = best_pipeline(tmp_path)
    src, out = photos(tmp_path / "in"), tmp_path / "out"
    (tmp_path / "a-file").write_text("")
    env = {**environment(tmp_path, pipeline), "RAY_TMPDIR": str(tmp_path / "a-file" / "ray")}  # cannot be made
    failed = apply_cli(env, tmp_path, pipeline, src, out)
    assert failed.returncode == 1, failed.stderr
    assert "error: the embedded Ray did not start" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    assert not any(out.glob("*.png"))
