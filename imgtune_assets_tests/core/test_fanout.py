"""Ray fan-out on a real local Ray: same numbers as a plain loop, failures isolated per trial,
a worker killed mid-sweep changes nothing, and Ray's own failures are told from the trials'."""

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.core.evaluate import evaluate_chunk
from imgtune_assets.core.fanout import (RAY_INFRASTRUCTURE_ERRORS, DecodedChunks, ImageDataError, ImageFiles,
                                        InMemoryImages, RayInfrastructureError, plan_chunks, ray_infrastructure_error,
                                        run_trials)
from imgtune_assets.core.manifest import load_images, scan_folder
from imgtune_assets.core.metrics import Objective

PSNR = Objective("psnr")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fan")
    make_denoise_set(folder, count=8, size=128)
    return load_images(folder, scan_folder(folder, needs_target=True))


def trials(n, extra=None):
    out = []
    for k in range(n):
        stages = [["bilateral_filter", {"d": 3 + k % 5, "sigma_color": 20.0 + 7 * k, "sigma_space": 5.0}],
                  ["gaussian_blur", {"ksize": 3 + 2 * (k % 3), "sigma": 0.5 + 0.1 * k}]]
        out.append({"trial": f"trial-{k:03d}", "params": {"k": k}, "stages": stages})
    return out + (extra or [])


def test_plan_chunks():
    assert plan_chunks(64, 128, 2) == 64          # plenty of trials: whole image sets per task
    assert plan_chunks(64, 1, 2) == 16            # one trial: split so every CPU gets work
    assert plan_chunks(3, 1, 8) == 1
    assert plan_chunks(10, 4, 2, chunk_size=4) == 4
    # a sweep's own chunk size, kept within the memory budget: a larger chunk would spill
    assert plan_chunks(30, 6, 2, chunk_size=10, image_bytes=70 << 20, memory_budget=150 << 20) == 2
    assert plan_chunks(30, 6, 2, chunk_size=10, image_bytes=70 << 20, memory_budget=10 << 20) == 1


def test_the_budget_is_the_smallest_working_nodes_store_and_every_cpu_counts():
    from imgtune_assets.core.fanout import capacity_of

    def node(cpus, store, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus, "object_store_memory": store} if cpus else
                {"object_store_memory": store}}

    nodes = [node(1, 1500e6), node(1, 80e6), node(4, 9e9, alive=False), node(0, 10e6)]  # a dead one, a CPU-less head
    assert capacity_of(nodes) == {"CPU": 2, "object_store_memory": 80e6}
    assert capacity_of([node(0, 10e6)]) is None


def test_a_spill_is_measured_on_a_real_ray():
    """(A Ray of its own with a small object store, in a fresh interpreter.)"""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import numpy as np, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
                 logging_level="ERROR")
        from imgtune_assets.core.fanout import SpillWatch
        watch = SpillWatch()
        assert watch.spilled() == 0, watch.spilled()
        held = [ray.put(np.zeros(30 * 2**20, np.uint8)) for _ in range(5)]  # 150 MiB into 80
        print(watch.spilled())
        ray.shutdown()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 60 * 2**20


def test_ray_results_equal_a_plain_loop(local_ray, images):
    ids, imgs, tgts = images
    outcomes = run_trials(trials(5), InMemoryImages(ids, imgs, tgts), PSNR, chunk_size=3).outcomes
    for outcome, trial in zip(outcomes, trials(5)):
        expected = evaluate_chunk([tuple(s) for s in trial["stages"]], imgs, tgts, PSNR)
        assert [r["score"] for r in outcome.per_image] == [r["score"] for r in expected]
        assert outcome.status == "ok" and outcome.score == pytest.approx(np.mean([r["score"] for r in expected]))
        assert len(outcome.workers) == 3  # 8 images in chunks of 3
        assert all(len(w["node_id"]) > 10 and w["pid"] != os.getpid() for w in outcome.workers)


def test_one_failing_trial_does_not_fail_the_others(local_ray, images):
    ids, imgs, tgts = images
    bad = {"trial": "trial-bad", "params": {}, "stages": [["sobel", {"ksize": 3, "scale": 1.0, "dx": 0, "dy": 0}]]}
    invalid = {"trial": "trial-invalid", "params": {}, "stages": [], "error": "parameters refused"}
    outcomes = {o.trial: o for o in run_trials(trials(3, [bad, invalid]), InMemoryImages(ids, imgs, tgts), PSNR).outcomes}
    assert outcomes["trial-bad"].status == "failed" and "dx+dy > 0" in outcomes["trial-bad"].first_error
    assert np.isnan(outcomes["trial-bad"].score)
    assert outcomes["trial-invalid"].status == "failed" and outcomes["trial-invalid"].first_error == "parameters refused"
    assert all(outcomes[f"trial-{k:03d}"].status == "ok" for k in range(3))


def _own_raylets(ray) -> list[psutil.Process]:
    """The raylet of the Ray this test process is connected to (``local_ray``: ``ray.init(address="local")``
    starts the node's processes as children of the driver), found by its socket (in the Ray's session
    folder) among this process's descendants — never a raylet of another Ray on the machine."""
    sockets = {f"--raylet_socket_name={node['RayletSocketName']}" for node in ray.nodes() if node["Alive"]}
    raylets = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == "raylet" and sockets & set(proc.cmdline()):
                raylets.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return raylets


def _busy_workers(raylets: list[psutil.Process]) -> list[int]:
    """The workers of ``raylets`` (their children) running an imgtune task (Ray titles them
    ``ray::<task name>``)."""
    found = []
    for raylet in raylets:
        try:
            workers = raylet.children()
        except psutil.NoSuchProcess:
            continue
        for proc in workers:
            try:
                cmd = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if cmd.startswith("ray::imgtune:"):
                found.append(proc.pid)
    return found


def _kill_a_busy_worker(raylets: list[psutil.Process], killed: list, seconds: float = 30) -> None:
    """SIGKILL the first worker of ``raylets`` seen running an imgtune task (its pid goes to ``killed``)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not killed:
        for pid in _busy_workers(raylets):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            break
        time.sleep(0.01)


def test_worker_killed_mid_sweep_changes_nothing(local_ray, images):
    ids, imgs, tgts = images
    # nl_means is slow enough (tens of ms an image) to catch a worker in the middle of a task.
    slow = [{"trial": f"trial-{k:03d}", "params": {},
             "stages": [["nl_means", {"h": 8.0 + k, "template_window_size": 7, "search_window_size": 21}]]}
            for k in range(6)]
    undisturbed = run_trials(slow, InMemoryImages(ids, imgs, tgts), PSNR, chunk_size=2).outcomes

    raylets = _own_raylets(local_ray)
    assert len(raylets) == 1, raylets  # this module's Ray: one node
    killed = []
    killer = threading.Thread(target=_kill_a_busy_worker, args=(raylets, killed))
    killer.start()
    disturbed = run_trials(slow, InMemoryImages(ids, imgs, tgts), PSNR, chunk_size=2).outcomes
    killer.join()
    assert killed, "no busy Ray worker was found to kill"
    assert [o.status for o in disturbed] == ["ok"] * 6
    assert [o.score for o in disturbed] == [o.score for o in undisturbed]
    assert all(w["pid"] not in killed for o in disturbed for w in o.workers)


@pytest.fixture(scope="module")
def slow_images(tmp_path_factory):
    # nl_means with a 35-pixel search window on 4 images of 256×256: about 0.5 s per trial on one core.
    folder = tmp_path_factory.mktemp("slow")
    make_denoise_set(folder, count=4, size=256)
    return load_images(folder, scan_folder(folder, needs_target=True))


def test_ticks_come_while_no_trial_completes(local_ray, slow_images):
    ids, imgs, tgts = slow_images
    slow = [{"trial": f"trial-{k:03d}", "params": {},
             "stages": [["nl_means", {"h": 8.0 + k, "template_window_size": 7, "search_window_size": 35}]]}
            for k in range(4)]
    events = []
    start = time.monotonic()
    outcomes = run_trials(slow, InMemoryImages(ids, imgs, tgts), PSNR, chunk_size=4,  # one task per trial
                          on_trial_done=lambda o: events.append(("done", time.monotonic())),
                          on_tick=lambda: events.append(("tick", time.monotonic())), tick_seconds=0.1).outcomes
    assert [o.status for o in outcomes] == ["ok"] * 4
    ticks = [t for kind, t in events if kind == "tick"]
    dones = [t for kind, t in events if kind == "done"]
    assert len(dones) == 4
    # Ticks while nothing completes: several before the first trial is back (each takes ~0.5 s, five ticks).
    assert sum(1 for t in ticks if t < dones[0]) >= 2
    # Regular: no gap much longer than tick_seconds (generous slack for a busy machine).
    gaps = np.diff([start, *ticks])
    assert gaps.max() < 0.1 + 2.0, gaps
    # And a last tick once every result is in.
    assert events[-1][0] == "tick" and ticks[-1] >= dones[-1]


def test_on_tail_comes_once_when_a_cpu_has_nothing_left_to_do(local_ray, slow_images):
    ids, imgs, tgts = slow_images
    slow = [{"trial": f"trial-{k:03d}", "params": {},
             "stages": [["nl_means", {"h": 8.0 + k, "template_window_size": 7, "search_window_size": 35}]]}
            for k in range(4)]
    done, tail = [], []
    # Four tasks (one per trial) on 2 CPUs: not before three are back (one left for two CPUs).
    run_trials(slow, InMemoryImages(ids, imgs, tgts), PSNR, chunk_size=4,
               on_trial_done=lambda o: done.append(o.trial), on_tail=lambda: tail.append(len(done)))
    assert len(done) == 4 and len(tail) == 1 and tail[0] >= 3, tail
    # One task for 2 CPUs: at once, before its result.
    done, tail = [], []
    run_trials(slow[:1], InMemoryImages(ids, imgs, tgts), PSNR, chunk_size=4,
               on_trial_done=lambda o: done.append(o.trial), on_tail=lambda: tail.append(len(done)))
    assert tail == [0] and done == ["trial-000"]


def test_a_long_tick_does_not_hold_results_back(local_ray, images):
    ids, imgs, tgts = images
    ticks = []
    done_at = []
    start = time.monotonic()
    outcomes = run_trials(trials(4), InMemoryImages(ids, imgs, tgts), PSNR, on_tick=lambda: ticks.append(time.monotonic()),
                          on_trial_done=lambda o: done_at.append(time.monotonic()), tick_seconds=120.0).outcomes
    elapsed = time.monotonic() - start
    assert elapsed < 60, "the loop waited for the tick instead of taking results as they came"
    assert len(done_at) == 4 and len(ticks) == 1 and ticks[0] >= max(done_at)  # only the final tick
    plain = run_trials(trials(4), InMemoryImages(ids, imgs, tgts), PSNR).outcomes
    assert [o.score for o in outcomes] == [o.score for o in plain]


def test_an_error_in_on_tick_propagates(local_ray, images):
    ids, imgs, tgts = images

    def boom():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_trials(trials(2), InMemoryImages(ids, imgs, tgts), PSNR, on_tick=boom, tick_seconds=0.01)
    with pytest.raises(ValueError, match="tick_seconds"):
        run_trials(trials(1), InMemoryImages(ids, imgs, tgts), PSNR, on_tick=lambda: None, tick_seconds=0)


# ------------------------------------------------------------------ images as files, decoded by Ray tasks
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    make_denoise_set(folder, count=8, size=96)
    return folder, scan_folder(folder, needs_target=True)


def test_files_are_decoded_once_by_ray_tasks_and_score_like_a_plain_loop(local_ray, image_files, monkeypatch):
    folder, rows = image_files
    puts = []
    real_put = local_ray.put
    monkeypatch.setattr(local_ray, "put", lambda value, *a, **k: puts.append(value) or real_put(value, *a, **k))
    result = run_trials(trials(3), ImageFiles(folder, rows), PSNR, chunk_size=3, identity=True)
    ids, imgs, tgts = load_images(folder, rows)
    assert puts == []  # the pixels never passed through this process: the decode tasks made them
    assert result.chunks == 3 and result.chunks_decoded == 3 and result.chunk_size == 3
    assert result.decodes == 16  # 8 images and 8 targets, each decoded once
    for outcome, trial in zip(result.outcomes, trials(3)):
        expected = evaluate_chunk([tuple(s) for s in trial["stages"]], imgs, tgts, PSNR)
        assert outcome.image_ids == ids
        assert [r["score"] for r in outcome.per_image] == [r["score"] for r in expected]
    identity = evaluate_chunk([("identity", {})], imgs, tgts, PSNR)
    assert [result.identity[i]["score"] for i in ids] == [r["score"] for r in identity]


def test_a_small_budget_streams_chunks_through_the_object_store(local_ray, image_files):
    folder, rows = image_files
    whole = run_trials(trials(2), ImageFiles(folder, rows), PSNR, chunk_size=2)
    one_chunk = 2 * 2 * 96 * 96  # two images and their targets, 8-bit grey
    retired = []
    streamed = run_trials(trials(2), ImageFiles(folder, rows), PSNR, chunk_size=2, memory_budget=one_chunk,
                          fuse=False,
                          on_chunk_done=lambda ids, results, identity: retired.append((ids, sorted(results))))
    assert not whole.fused and not streamed.fused
    assert whole.window == 4 and streamed.window == 1  # one chunk in the object store at a time
    assert [o.score for o in streamed.outcomes] == [o.score for o in whole.outcomes]
    assert [ids for ids, _ in retired] == [[r.id for r in rows][i:i + 2] for i in (0, 2, 4, 6)]
    assert all(trial_keys == ["trial-000", "trial-001"] for _, trial_keys in retired)


def test_streaming_chunks_are_decoded_and_scored_by_one_task_each(local_ray, image_files, monkeypatch):
    # Images that do not fit the budget at once, in at least two chunks per CPU (local_ray has 2): each chunk
    # is decoded and scored by all its trials in one task, so no pixels enter the object store.
    folder, rows = image_files
    puts, retired = [], []
    real_put = local_ray.put
    monkeypatch.setattr(local_ray, "put", lambda value, *a, **k: puts.append(value) or real_put(value, *a, **k))
    one_chunk = 2 * 2 * 96 * 96
    fused = run_trials(trials(3), ImageFiles(folder, rows), PSNR, chunk_size=2, memory_budget=one_chunk,
                       identity=True,
                       on_chunk_done=lambda ids, results, identity: retired.append((ids, sorted(results), identity)))
    assert fused.fused and fused.window == 0 and fused.chunks_decoded == 4 and puts == []
    assert fused.decodes == 16  # 8 images and 8 targets, each decoded once
    ids, imgs, tgts = load_images(folder, rows)
    for outcome, trial in zip(fused.outcomes, trials(3)):
        expected = evaluate_chunk([tuple(s) for s in trial["stages"]], imgs, tgts, PSNR)
        assert [r["score"] for r in outcome.per_image] == [r["score"] for r in expected]
        assert sorted(w["chunk"] for w in outcome.workers) == [0, 1, 2, 3]
    identity = evaluate_chunk([("identity", {})], imgs, tgts, PSNR)
    assert [fused.identity[i]["score"] for i in ids] == [r["score"] for r in identity]
    # progress is still handed over chunk by chunk, with the chunk's identity results
    assert sorted(tuple(i) for i, _, _ in retired) == [tuple(ids[i:i + 2]) for i in (0, 2, 4, 6)]
    assert all(keys == ["trial-000", "trial-001", "trial-002"] and len(ident) == 2 for _, keys, ident in retired)
    # images that fit at once keep a task per (trial, chunk), so that trials complete one after another
    assert not run_trials(trials(3), ImageFiles(folder, rows), PSNR, chunk_size=2).fused
    with pytest.raises(ValueError, match="fuse=True"):
        run_trials(trials(1), ImageFiles(folder, rows), PSNR, fuse=True, keep=DecodedChunks(capacity=1))


def test_a_fused_chunk_with_a_failing_trial_fails_that_trial_only(local_ray, image_files):
    folder, rows = image_files
    bad = {"trial": "trial-bad", "params": {}, "stages": [["sobel", {"ksize": 3, "scale": 1.0, "dx": 0, "dy": 0}]]}
    outcomes = {o.trial: o for o in run_trials(trials(2, [bad]), ImageFiles(folder, rows), PSNR, chunk_size=2,
                                               fuse=True).outcomes}
    assert outcomes["trial-bad"].status == "failed" and "dx" in outcomes["trial-bad"].first_error
    assert [outcomes[k].status for k in ("trial-000", "trial-001")] == ["ok", "ok"]


def test_known_progress_is_not_decoded_or_computed_again(local_ray, image_files):
    folder, rows = image_files
    saved = {}
    first = run_trials(trials(2), ImageFiles(folder, rows), PSNR, chunk_size=2, identity=True,
                       on_chunk_done=lambda ids, results, identity: saved.update({tuple(ids): (results, identity)}))
    # Keep the progress of every chunk but the last, as a run killed before it finished would have.
    known, known_identity = {}, {}
    for ids, (results, identity) in list(saved.items())[:-1]:
        for trial, per_image in results.items():
            known.setdefault(trial, {}).update(zip(ids, per_image))
        known_identity.update(zip(ids, identity))
    resumed = run_trials(trials(2), ImageFiles(folder, rows), PSNR, chunk_size=2, identity=True, known=known,
                         known_identity=known_identity)
    assert resumed.chunks == 4 and resumed.chunks_decoded == 1 and resumed.decodes == 4
    assert [o.score for o in resumed.outcomes] == [o.score for o in first.outcomes]
    assert {i: r["score"] for i, r in resumed.identity.items()} == {i: r["score"] for i, r in first.identity.items()}


def test_kept_chunks_serve_the_next_call_without_decoding(local_ray, image_files):
    folder, rows = image_files
    one_chunk = 2 * 2 * 96 * 96
    keep = DecodedChunks(capacity=3 * one_chunk)  # room for three of the four chunks
    first = run_trials(trials(2), ImageFiles(folder, rows), PSNR, chunk_size=2, keep=keep)
    assert first.chunks_decoded == 4 and len(keep.refs) == 3 and keep.held == 3 * one_chunk
    # the next call (other trials, same images): only the chunk that did not fit is decoded again
    second = run_trials(trials(4)[2:], ImageFiles(folder, rows), PSNR, chunk_size=2, keep=keep)
    assert second.chunks_decoded == 1 and second.decodes == 4
    assert [o.score for o in second.outcomes] == [o.score for o in run_trials(
        trials(4)[2:], ImageFiles(folder, rows), PSNR, chunk_size=2).outcomes]
    # a call on the images of a kept chunk (a later rung of successive halving) decodes nothing
    kept_ids = next(iter(keep.refs))
    subset = [r for r in rows if r.id in kept_ids]
    third = run_trials(trials(1), ImageFiles(folder, subset), PSNR, chunk_size=2, keep=keep)
    assert third.chunks_decoded == 0 and third.outcomes[0].image_ids == list(kept_ids)
    by_id = dict(zip(first.outcomes[0].image_ids, first.outcomes[0].per_image))
    assert [r["score"] for r in third.outcomes[0].per_image] == [by_id[i]["score"] for i in kept_ids]
    keep.clear()
    assert keep.held == 0 and run_trials(trials(1), ImageFiles(folder, subset), PSNR, chunk_size=2,
                                         keep=keep).chunks_decoded == 1


@pytest.mark.parametrize("fuse", [False, True], ids=["chunks in the object store", "fused"])
def test_an_image_changed_since_the_manifest_fails_the_run_naming_it(local_ray, tmp_path, fuse):
    make_denoise_set(tmp_path, count=4, size=64)
    rows = scan_folder(tmp_path, needs_target=True)
    victim = tmp_path / rows[2].image_path
    victim.write_bytes(victim.read_bytes() + b"\0")  # same pixels, other bytes: not the image the manifest saw
    done = []
    with pytest.raises(ImageDataError, match=rf"{victim.name}: changed since the image manifest"):
        run_trials(trials(2), ImageFiles(tmp_path, rows), PSNR, chunk_size=4, on_trial_done=done.append, fuse=fuse)
    assert done == []  # no trial is recorded as failed because of the data


@pytest.mark.parametrize("fuse", [False, True], ids=["chunks in the object store", "fused"])
def test_worker_killed_while_chunks_live_in_the_object_store_changes_nothing(local_ray, tmp_path, fuse):
    # 256² images: a chunk of two with targets is 256 KB, so it lives in the object store (not inline), made
    # by a decode task whose worker may be the one killed; the chunk outlives it (its owner is this process).
    make_denoise_set(tmp_path, count=4, size=256)
    rows = scan_folder(tmp_path, needs_target=True)
    slow = [{"trial": f"trial-{k:03d}", "params": {},
             "stages": [["nl_means", {"h": 8.0 + k, "template_window_size": 7, "search_window_size": 21}]]}
            for k in range(4)]
    # (fused: the killed worker may be one decoding and scoring a chunk; Ray runs its task again)
    undisturbed = run_trials(slow, ImageFiles(tmp_path, rows), PSNR, chunk_size=2).outcomes
    raylets = _own_raylets(local_ray)
    assert len(raylets) == 1, raylets  # this module's Ray: one node
    killed = []
    killer = threading.Thread(target=_kill_a_busy_worker, args=(raylets, killed))
    killer.start()
    disturbed = run_trials(slow, ImageFiles(tmp_path, rows), PSNR, chunk_size=2, fuse=fuse)
    killer.join()
    assert disturbed.fused is fuse
    assert killed, "no busy Ray worker was found to kill"
    assert [o.status for o in disturbed.outcomes] == ["ok"] * 4
    assert [o.score for o in disturbed.outcomes] == [o.score for o in undisturbed]
    assert disturbed.chunks == 2 and disturbed.decodes >= 8  # every file decoded (again, if a decode was killed)


# ----------------------------------------------------------------------------- Ray's failures, not the trials'
def _ray_errors():
    import ray
    import ray.exceptions as rex

    oid = ray.ObjectRef.nil().hex()
    return rex, {
        "raylet died": rex.LocalRayletDiedError(),
        "node died": rex.NodeDiedError("node 1234 died"),
        "object lost": rex.ObjectLostError(oid, None, ""),
        "owner died": rex.OwnerDiedError(oid, None, ""),
        "system": rex.RaySystemError("the GCS went away"),
        "actor died": rex.ActorDiedError(),
        "in a task": rex.RayTaskError("f", "Traceback ...", rex.LocalRayletDiedError()),
    }


def test_ray_infrastructure_errors_are_told_from_the_trials_own():
    rex, infrastructure = _ray_errors()
    for name, exc in infrastructure.items():
        lost = ray_infrastructure_error(exc)
        assert isinstance(lost, RayInfrastructureError) and lost.ray_error is not None, name
        assert "skip_finished" in str(lost) and "--resume" in str(lost), name
    died = ray_infrastructure_error(infrastructure["raylet died"])
    assert died.what == "the Ray node died during the sweep: LocalRayletDiedError: The task's local raylet died. " \
                        "Check raylet.out for more information"
    assert ray_infrastructure_error(infrastructure["node died"]).what.startswith(
        "the Ray node died during the sweep: NodeDiedError: node 1234 died")
    assert ray_infrastructure_error(infrastructure["owner died"]).what.startswith("Ray lost an object of the sweep")
    assert ray_infrastructure_error(infrastructure["in a task"]).what.startswith("the Ray node died")
    # the trial's own failures: an exception its code raised (as Ray hands it over), a worker lost beyond
    # Ray's retries on a live node, Ray's memory monitor, an image that cannot be used, anything else
    user = rex.RayTaskError("f", "Traceback ...", ValueError("bad parameters"))
    for exc in (user, user.as_instanceof_cause(), rex.WorkerCrashedError(), rex.OutOfMemoryError("task used 9 GB"),
                ImageDataError("images/a.png: changed since the image manifest"), RuntimeError("x"), ValueError()):
        assert ray_infrastructure_error(exc) is None, repr(exc)


def test_the_infrastructure_list_names_every_subclass_in_the_installed_ray():
    # a record's error is recognised by these names (results.lost_to_ray): a Ray upgrade that adds or moves
    # an error class shows here
    import ray.exceptions as rex

    def family(*roots):
        out, todo = set(), list(roots)
        while todo:
            cls = todo.pop()
            if cls.__module__.startswith("ray") and "(" not in cls.__name__:  # (not RayTaskError(ValueError))
                out.add(cls.__name__)
            todo += cls.__subclasses__()
        return out

    roots = [getattr(rex, n) for n in RAY_INFRASTRUCTURE_ERRORS]
    assert set(RAY_INFRASTRUCTURE_ERRORS) == family(*roots)
    assert len(set(RAY_INFRASTRUCTURE_ERRORS)) == len(RAY_INFRASTRUCTURE_ERRORS)
    assert not {"RayTaskError", "WorkerCrashedError", "OutOfMemoryError", "RayError"} & set(RAY_INFRASTRUCTURE_ERRORS)


@pytest.mark.parametrize("fuse", [False, True], ids=["chunks in the object store", "fused"])
@pytest.mark.parametrize("lost", ["first", "last"])
def test_ray_failing_under_the_run_records_no_trial_and_hands_over_what_finished(local_ray, image_files,
                                                                                 monkeypatch, fuse, lost):
    # Ray's node dying, as ray.get sees it: the first or the last result asked for is LocalRayletDiedError.
    # 8 images in 4 chunks of 2, 3 trials: 4 decode and 12 trial tasks (fused: 4 tasks); the last result back
    # is a trial task's (or a fused chunk's), as a chunk's trial tasks take its decoded object.
    import ray
    import ray.exceptions as rex

    folder, rows = image_files
    real_get, calls = ray.get, []
    total = 4 if fuse else 16

    def get(ref, *args, **kwargs):
        calls.append(ref)
        if len(calls) == (1 if lost == "first" else total):
            raise rex.LocalRayletDiedError()
        return real_get(ref, *args, **kwargs)

    monkeypatch.setattr(ray, "get", get)
    done, chunks = [], []
    with pytest.raises(RayInfrastructureError, match="the Ray node died during the sweep: LocalRayletDiedError"):
        run_trials(trials(3), ImageFiles(folder, rows), PSNR, chunk_size=2, fuse=fuse, on_trial_done=done.append,
                   on_chunk_done=lambda ids, results, identity: chunks.append(results))
    assert [o.status for o in done] == ["ok"] * len(done)  # nothing recorded as failed for it
    assert all(not r.get("error") for results in chunks for per_image in results.values() for r in per_image)
    if lost == "last":  # everything else was back: handed over; the lost task's chunk and trial are not
        assert len(calls) == total
        assert len(chunks) == 3
        assert len(done) == (0 if fuse else 2)


def test_a_cluster_whose_gcs_stops_answering_is_given_up_after_the_grace():
    """ClusterWatch on a real loopback port: answering, then closed for less than the grace (a blip),
    then for the grace: RayInfrastructureError naming the address; never more than one probe per
    ``every`` seconds."""
    import socket

    from imgtune_assets.core.fanout import ClusterWatch, RayInfrastructureError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    now = [100.0]
    watch = ClusterWatch(f"127.0.0.1:{port}", grace=10.0, every=2.0, clock=lambda: now[0])
    probes = []
    answers = watch.answers
    watch.answers = lambda: probes.append(now[0]) or answers()
    watch.check()
    now[0] += 1.0
    watch.check()  # too soon: not probed
    assert probes == [100.0]
    server.close()
    for _ in range(5):  # refused at once, then 2, 4, 6 and 8 s later: within the grace
        now[0] += 2.0
        watch.check()
    now[0] += 2.5
    with pytest.raises(RayInfrastructureError, match=rf"^the Ray cluster stopped answering: its GCS at 127.0.0.1:{port} "
                                                     r"has refused connections for 10 s"):
        watch.check()
    assert len(probes) == 7
