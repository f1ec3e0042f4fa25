"""Cluster mode on a real two-node Ray cluster on loopback (127.0.0.2 head, 127.0.0.3 worker), token
authentication on, driven through the real ``dagster asset materialize`` CLI: the experiment tasks
run on both nodes; decoding is shared by the nodes and trial tasks run where their chunk was decoded;
images held in the driver travel through Ray's object store, not as file names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from dagster import DagsterInstance

from imgtune_assets.cli import sweep_commands
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.keys import asset_key
from imgtune_assets_tests.support import cli_env, gone, run_checked, write_sweep
from imgtune_assets_tests.support.processes import ended_after
from imgtune_assets_tests.support.raycluster import RayCluster, start_ray_cluster

TRIALS = 6


def cluster_env(tmp_path, sweep, cluster: RayCluster, **extra) -> dict[str, str]:
    """The CLI's environment for a cluster: its address and token; no loopback switch (that one is for
    an embedded single-node Ray, and a client of a multi-node cluster must not carry it)."""
    env = cli_env(tmp_path, sweep, IMGTUNE_RAY_ADDRESS=cluster.address, **cluster.env, **extra)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def run_sweep_cli(env) -> list[float]:
    """The three commands a user types (imgtune_assets.cli.sweep_commands), each checked; their seconds."""
    sweep = load_sweep(env["IMGTUNE_SWEEP"])
    seconds = []
    for command in sweep_commands(sweep.name, trial_keys(sweep)):
        started = time.perf_counter()
        run_checked(command, env, timeout=240)
        seconds.append(time.perf_counter() - started)
    return seconds


def small_cluster_sweep(tmp_path):
    data = tmp_path / "data"
    make_denoise_set(data, count=8, size=256)
    # 6 trials × 4 chunks of 2 images = 24 tasks for 2 single-CPU nodes, each long enough (non-local
    # means, ~0.1 s an image) for the second node's worker to start before the first has done them all.
    pipeline = [{"op": "nl_means", "h": {"type": "float", "low": 3, "high": 20}, "template_window_size": 7,
                 "search_window_size": 21}]
    return write_sweep(tmp_path / "sweep.yaml", data, name="cluster", trials=TRIALS, chunk_size=2, pipeline=pipeline)


def test_start_ray_cluster_on_loopback_with_token_auth_and_stop_ends_only_its_own(tmp_path):
    # A bystander that looks like Ray to anything matching by name (`ray stop`, `pkill -f raylet`).
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "raylet", "ray::IDLE"],
                                 stdin=subprocess.PIPE)
    mine = start_ray_cluster(tmp_path / "logs", nodes=2, num_cpus=1)
    try:
        processes = [p for node in mine.nodes for p in node.processes()]
        pids = {p.pid for p in processes}
        assert pids == mine.pids() and len(pids) >= 6  # 2 × (ray start, raylet, ...) + gcs_server
        listening: dict[int, set[tuple[str, int]]] = {}
        for pid in pids:
            try:
                listening[pid] = {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)
                                  for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                pass
        # Nodes advertise loopback addresses only (checked by start_ray_cluster: alive node IPs are the
        # 127.0.0.x given). Some multi-node Ray servers (raylet and GCS gRPC, workers) bind the wildcard
        # address and Ray offers no option against it; none binds a specific non-loopback address, and
        # each node serves on its own loopback address.
        specific = {ip for found in listening.values() for ip, _ in found} - {"::", "0.0.0.0"}
        assert specific and all(ip.startswith("127.") for ip in specific), listening
        assert {"127.0.0.2", "127.0.0.3"} <= specific, listening
        # The address handed to clients is the head's GCS: its gcs_server listens on that port.
        [gcs] = [p for p in processes if p.name().startswith("gcs_server")]
        assert int(mine.address.rpartition(":")[2]) in {port for _, port in listening[gcs.pid]}, listening
        # The token handed to clients is the one the cluster's processes run with.
        for node_process in [gcs, *(p for p in processes if p.name() == "raylet")]:
            environ = node_process.environ()
            assert environ.get("RAY_AUTH_MODE") == "token", node_process
            assert environ.get("RAY_AUTH_TOKEN") == mine.env["RAY_AUTH_TOKEN"], node_process
        # A client without the token is refused: the cluster really uses token authentication.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        # (Ray's client tries its GCS connection 20 times, a second apart: 2 tries are enough here.)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, RAY_gcs_server_port_wait_time_s="2")
        refused = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={mine.address!r})"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "auth" in (refused.stderr + refused.stdout).lower()
        # imgtune's `apply` with the address but no RAY_AUTH_MODE: an error that says what to set, no traceback.
        env.pop("RAY_AUTH_MODE"), env.pop("RAY_AUTH_TOKEN")
        make_denoise_set(tmp_path / "data", count=2, size=64)
        sweep = write_sweep(tmp_path / "fixed.yaml", tmp_path / "data", name="fixed", trials=1,
                            pipeline=[{"op": "gaussian_blur", "ksize": 3, "sigma": 1.0}])
        applied = subprocess.run([sys.executable, "-m", "imgtune_assets.cli", "apply", str(sweep),
                                  str(tmp_path / "data"), str(tmp_path / "out"), "--ray-address", mine.address],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert applied.returncode == 1, applied.stderr
        assert f"error: cannot connect to the Ray cluster at {mine.address}: " in applied.stderr
        assert "AuthenticationError" in applied.stderr and "export RAY_AUTH_MODE=token" in applied.stderr
        assert "Traceback" not in applied.stderr, applied.stderr
    finally:
        mine.stop()
        alive_after_stop = bystander.poll() is None
        bystander.stdin.close()  # ends it
        bystander.wait(timeout=30)
    assert all(gone(p) for p in processes), [p for p in processes if not gone(p)]
    assert not mine.temp_dir.exists()
    assert alive_after_stop, "stop() ended a process that was not the cluster's"


def test_sweep_on_a_two_node_cluster_uses_both_nodes(tmp_path, cluster):
    sweep = small_cluster_sweep(tmp_path)
    env = cluster_env(tmp_path, sweep, cluster)
    seconds = run_sweep_cli(env)
    print(f"\ncluster sweep: commands took {[round(s, 1) for s in seconds]} s")

    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        records = instance.fetch_materializations(asset_key("cluster", "experiment_results"), limit=100).records
        assert sorted(r.asset_materialization.partition for r in records) == [f"trial-{i:03d}" for i in range(TRIALS)]
        nodes = set()
        for record in records:
            metadata = record.asset_materialization.metadata
            assert metadata["status"].value == "ok"
            nodes |= set(metadata["nodes"].value)
        report = instance.fetch_materializations(asset_key("cluster", "sweep_report"), limit=1).records[0]
        assert report.asset_materialization.metadata["completed_trials"].value == TRIALS
    assert len(nodes) == 2, f"experiment tasks ran on {nodes}"
    summary = json.loads((tmp_path / "outputs" / "cluster" / "report.json").read_text())
    assert summary["completed_trials"] == TRIALS and summary["best_trial"]


# The fan-out on the cluster, fed with images that exist only in the driver's memory: no file of
# them exists anywhere, so the tasks can only have received the pixels through the object store.
# Each task takes a while (non-local means, ~0.3 s per chunk): with very short tasks the first worker
# leased can finish them all before the other node has started one (Ray reuses a leased worker for
# the queued tasks), and the fan-out would use one node whatever its scheduling strategy.
_IN_MEMORY_FANOUT = textwrap.dedent("""
    import json, sys
    import numpy as np, ray
    from imgtune_assets.core import fanout
    from imgtune_assets.core.metrics import Objective
    from imgtune_assets.defs.resources import RayResource

    RayResource(address=sys.argv[1]).connect()
    rng = np.random.default_rng(0)
    clean = [rng.integers(0, 255, (384, 384), dtype=np.uint8) for _ in range(6)]
    noisy = [np.clip(c + rng.normal(0, 20, c.shape), 0, 255).astype(np.uint8) for c in clean]
    puts = []
    real_put = ray.put
    def counting_put(value, *a, **k):
        puts.append(type(value).__name__)
        return real_put(value, *a, **k)
    ray.put = counting_put
    trials = [{"trial": f"t{i}", "params": {},
               "stages": [["nl_means", {"h": 5.0 + 5 * i, "template_window_size": 7, "search_window_size": 21}]]}
              for i in range(4)]
    outcomes = fanout.run_trials(trials, fanout.InMemoryImages([f"img{i}" for i in range(6)], noisy, clean),
                                 Objective("psnr"), chunk_size=2, max_retries=0).outcomes
    print(json.dumps({"puts": puts,
                      "nodes": sorted({w["node_id"] for o in outcomes for w in o.workers}),
                      "errors": [o.error for o in outcomes if o.error],
                      "scored": [sum(1 for r in o.per_image if r and r["error"] is None) for o in outcomes]}))
""")


def test_fanout_ships_pixels_through_the_object_store(tmp_path, cluster):
    env = cluster_env(tmp_path, tmp_path / "unused.yaml", cluster)
    result = subprocess.run([sys.executable, "-c", _IN_MEMORY_FANOUT, cluster.address], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == []
    assert report["scored"] == [6, 6, 6, 6]
    # One put per image chunk (3 chunks of 2) holding arrays, not paths, and its report: 12 tasks got refs.
    assert report["puts"] == ["tuple", "dict"] * 3  # each chunk's arrays, and its small report
    assert len(report["nodes"]) == 2


# Images as files, decoded by Ray tasks on the cluster: each chunk's trial tasks should run on the node
# that decoded it (Ray's locality-aware scheduling of tasks whose arguments are in a node's store).
_FILE_FANOUT = textwrap.dedent("""
    import json, sys
    from imgtune_assets.core import fanout
    from imgtune_assets.core.manifest import scan_folder
    from imgtune_assets.core.metrics import Objective
    from imgtune_assets.defs.resources import RayResource

    RayResource(address=sys.argv[1]).connect()
    rows = scan_folder(sys.argv[2], needs_target=True)
    trials = [{"trial": f"t{i}", "params": {},
               "stages": [["nl_means", {"h": 5.0 + 5 * i, "template_window_size": 7, "search_window_size": 21}]]}
              for i in range(4)]
    result = fanout.run_trials(trials, fanout.ImageFiles(sys.argv[2], rows), Objective("psnr"), chunk_size=2,
                               max_retries=0)
    fused = fanout.run_trials(trials, fanout.ImageFiles(sys.argv[2], rows), Objective("psnr"), chunk_size=2,
                              max_retries=0, fuse=True)
    print(json.dumps({"decode_nodes": {str(c): n for c, n in result.decode_nodes.items()},
                      "tasks": [[w["chunk"], w["node_id"]] for o in result.outcomes for w in o.workers],
                      "decodes": result.decodes, "errors": [o.error for o in result.outcomes if o.error],
                      "scores": [o.score for o in result.outcomes],
                      "fused": {"decode_nodes": sorted(set(fused.decode_nodes.values())), "decodes": fused.decodes,
                                "scores": [o.score for o in fused.outcomes]}}))
""")


def test_trial_tasks_run_where_their_chunk_was_decoded(tmp_path, cluster):
    data = tmp_path / "data"
    make_denoise_set(data, count=8, size=256)  # chunks of 2 images + targets: 256 KB, kept in a node's store
    env = cluster_env(tmp_path, tmp_path / "unused.yaml", cluster)
    result = subprocess.run([sys.executable, "-c", _FILE_FANOUT, cluster.address, str(data)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["decodes"] == 16  # 8 images and 8 targets, each once
    decoded_on = report["decode_nodes"]
    assert len(decoded_on) == 4 and len(set(decoded_on.values())) == 2  # decoding shared by both nodes
    local = sum(1 for chunk, node in report["tasks"] if decoded_on[str(chunk)] == node)
    # A preference, not a rule: a busy node's task may spill back to the idle one (which then pulls the
    # chunk). Chance alone would give 8 of 16; three runs here gave 16, 16 and 13.
    assert len(report["tasks"]) == 16 and local >= 10, report
    # Fused (each chunk read, decoded and scored by one task): spread over both nodes, the same scores.
    fused = report["fused"]
    assert fused["decodes"] == 16 and len(fused["decode_nodes"]) == 2 and fused["scores"] == report["scores"]


def test_embedded_ray_never_joins_a_cluster_found_in_the_environment(tmp_path, cluster):
    # Ray's own ray.init() would connect to RAY_ADDRESS (or /tmp/ray/ray_current_cluster, left by any
    # `ray start --head`); the embedded default must start its own single-node Ray regardless.
    probe = (
        "import ray\n"
        "from imgtune_assets.defs.resources import RayResource\n"
        "r = RayResource(num_cpus=1); r.connect()\n"
        "print('GCS', ray.get_runtime_context().gcs_address, 'NODES', len(ray.nodes()))\n"
        "r.teardown_after_execution(None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "IMGTUNE_RAY_ADDRESS"}
    env.update(RAY_ADDRESS=cluster.address, **cluster.env)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GCS 127.0.0.1:" in out.stdout and "NODES 1" in out.stdout, out.stdout
    assert cluster.address not in out.stdout


def test_apply_on_a_cluster_ends_as_interrupted_on_sigterm(tmp_path, cluster):
    """With --ray-address, ray.init puts Ray's own SIGTERM handler (a stack dump, then exit 15) in front
    of the command's: the command takes SIGTERM back once connected, and ends as interrupted."""
    from imgtune_assets_tests.support.files import SLOW_STAGES, slow_folder, wait_for_outputs

    src, out = tmp_path / "in", tmp_path / "out"
    names = slow_folder(src)
    pipeline = write_sweep(tmp_path / "best.yaml", tmp_path / "data", name="best", trials=1,
                           pipeline=[{"op": op, **params} for op, params in SLOW_STAGES])
    env = cluster_env(tmp_path, pipeline, cluster)
    proc = subprocess.Popen([sys.executable, "-m", "imgtune_assets.cli", "apply", str(pipeline), str(src), str(out),
                             "--ray-address", cluster.address], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for_outputs(proc, out)
        proc.send_signal(15)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted: the ledger" in stderr and "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr
    listed = json.loads((out / ".imgtune-applied.json").read_text())["entries"]
    assert len(listed) < len(names) and all((out / Path(e["output"]).name).exists() for e in listed)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_cluster_that_stops_mid_sweep_fails_the_run_saying_so(tmp_path, sampler):
    """The cluster's GCS gone under a sweep (its head stopping): Ray's client would wait 60 s for it and
    then end the run's process from C++ (no message, the Dagster run left STARTED for ever). The run
    fails naming the cluster, keeps the trials it finished, and is marked failed; a resume on another
    Ray completes it. (A head whose raylet dies first is a dead node: that message, tested elsewhere.)"""
    data = tmp_path / "data"
    make_denoise_set(data, count=8, size=256)
    pipeline = [{"op": "nl_means", "h": {"type": "float", "low": 3, "high": 20}, "template_window_size": 7,
                 "search_window_size": 21}]
    # (tpe: rounds of 4 trials, each shorter than the grace the watch gives the GCS: one watch for all)
    staged = {"sampler": "tpe", "search": {"batch_size": 4, "n_startup": 4}} if sampler == "tpe" else {}
    sweep = write_sweep(tmp_path / "sweep.yaml", data, name="lost", trials=24, chunk_size=8, pipeline=pipeline,
                        **staged)
    trials = tmp_path / "outputs" / "lost" / "trials"
    mine = start_ray_cluster(tmp_path / "cluster", nodes=1, num_cpus=2)
    try:
        env = cluster_env(tmp_path, sweep, mine)
        proc = subprocess.Popen([sys.executable, "-m", "imgtune_assets.cli", "sweep"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

        def three_trials_saved() -> None:
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline and len(list(trials.glob("trial-*.json"))) < 3:
                time.sleep(0.05)

        def kill_gcs() -> None:  # the head's control store goes: the raylet lives on, so no task fails
            [gcs] = [p for p in map(psutil.Process, mine.pids()) if p.name().startswith("gcs_server")]
            gcs.kill()

        stdout, stderr, seconds = ended_after(proc, three_trials_saved, kill_gcs)
    finally:
        mine.stop()
    assert proc.returncode != 0, (stdout, stderr)
    print(f"\nthe GCS's loss detected and the command ended in {seconds:.1f}s")
    assert seconds < 55, (stdout, stderr)  # before Ray's own 60 s end
    said = stdout + stderr
    assert "the Ray cluster stopped answering: its GCS at" in said and "sweep lost --resume" in said, said[-4000:]
    saved = len(list(trials.glob("trial-*.json")))
    assert 3 <= saved < 24
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        [run] = instance.get_runs()
        assert run.status.value == "FAILURE"
    resumed = subprocess.run([sys.executable, "-m", "imgtune_assets.cli", "sweep", "--resume"],
                             env=cli_env(tmp_path, sweep), capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "24/24 trials completed" in resumed.stdout and len(list(trials.glob("trial-*.json"))) == 24
