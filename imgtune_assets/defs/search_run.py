"""The experiment step of a staged sweep (adaptive sampler or early stopping): its rounds run on the
Ray fan-out inside the one ranged run that evaluates the sweep. The search itself (proposals, ledger,
successive halving, what the settings and the report say about it) is ``core/search.py``; this module
wires it to the asset's store, Ray and logs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from dagster import AssetExecutionContext, Failure

from imgtune_assets.core.manifest import ManifestRow, usable
from imgtune_assets.core.progress import partial_reuse_message, reuse_message
from imgtune_assets.core.report import prepare_in_background
from imgtune_assets.core.results import IdentityBaseline, TrialStore
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.search import Search, SearchError, early_stopping_notes, image_detail, warm_start_params
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.executor import steps_share_the_run_process
from imgtune_assets.defs.resources import RayResource


def report_imports_on_tail(context: AssetExecutionContext) -> Callable[[], object] | None:
    """``run_trials``' ``on_tail``: the report step's imports, begun while the fan-out's last tasks run —
    when that step runs in this process (the run's job has the in-process executor), else nothing."""
    return prepare_in_background if steps_share_the_run_process(context.job_def.executor_def) else None


def run_staged_search(context: AssetExecutionContext, sweep: Sweep, sweep_dir: Path, store: TrialStore,
                      rows: list[ManifestRow], keys: list[str], skip_finished: bool, ray_cluster: RayResource,
                      save: Callable[[dict, bool], None], on_tick: Callable[[], None],
                      on_plan: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run the rounds that hold ``keys``; each settled trial goes to ``save(record, reused)``, and
    ``on_tick`` is called at least every second while Ray works; with successive halving, ``on_plan``
    first gets the images a trial is expected to be scored on. Returns the step's statistics (also
    written to ``last_experiment_run.json``)."""
    from imgtune_assets.core.fanout import OBJECT_STORE_SHARE, ClusterWatch, DecodedChunks, ImageDataError, \
        ImageFiles, SpillWatch, cluster_capacity, data_error_message, plan_chunks, run_trials
    from imgtune_assets.core.manifest import decoded_bytes

    objective = sweep.objective
    digest = store.manifest_digest
    images = usable(rows)
    by_id = {r.id: r for r in images}
    records, _ = store.load_all(trial_keys(sweep))
    for message in store.damaged_messages():
        context.log.warning(message)
    records_by_key = {r["trial"]: r for r in records}
    requested = set(keys)
    recompute = set() if skip_finished else requested
    if skip_finished:  # (a requested trial with a current result is reused when its round settles)
        context.log.info(reuse_message(sum(1 for k in requested if k in records_by_key), len(requested)))
    ray_cluster.connect(context.log)
    resources = cluster_capacity()
    cpus = int(resources.get("CPU", 1))
    try:
        search = Search(sweep, sweep_dir, digest, [r.id for r in images], default_batch_size=cpus,
                        warm=warm_start_params(sweep, sweep_dir, digest),
                        image_detail=image_detail(images))
    except SearchError as exc:
        raise Failure(description=str(exc)) from None
    for note in early_stopping_notes(sweep, len(images)):
        context.log.warning(f"{sweep.path}: {note}")
    if sweep.early_stopping is not None and on_plan is not None:
        on_plan(sweep.early_stopping.expected_images_per_trial(search.rounds.batch_size, len(images)))
    known, known_identity = store.load_chunks() if skip_finished else ({}, {})
    if line := partial_reuse_message(known, [k for k in keys if k not in records_by_key]):
        context.log.info(line)
    baseline = IdentityBaseline(sweep_dir, objective, digest)
    need_identity = baseline.cached() is None
    identity: dict[str, dict[str, Any]] = dict(known_identity) if need_identity else {}
    workers: dict[str, list] = {}
    # Every round scores the same images: their decoded chunks stay in the object store from one round
    # to the next (up to half the decode budget; the rest is decoded again), on chunk boundaries that
    # do not change with the number of trials in a call.
    budget = ray_cluster.memory_budget_bytes() or int(resources.get("object_store_memory", 0) * OBJECT_STORE_SHARE)
    keep = DecodedChunks(capacity=budget // 2)
    chunk_size = plan_chunks(len(images), search.rounds.batch_size, cpus, sweep.chunk_size,
                             image_bytes=max((decoded_bytes(r) for r in images), default=0), memory_budget=budget)
    stats: dict[str, Any] = {"run_id": context.run.run_id, "trials": len(keys), "staged": True,
                             "batch_size": search.rounds.batch_size, "n_startup": search.rounds.n_startup,
                             "evaluations": 0, "rounds": [], "decodes": 0,
                             "ray_start_seconds": round(ray_cluster.connect_seconds, 3)}

    # One watch for every round: with a watch per round, a round shorter than its grace never saw the
    # GCS refuse for long enough, and Ray's own client ended the process, saying nothing, after 60 s.
    watch = ClusterWatch()
    spill = SpillWatch()

    def evaluate(trials, ids, known_now):
        watch.check()
        needed = [i for i in ids if any(i not in known_now.get(t["trial"], {}) for t in trials)
                  or (need_identity and i not in identity)]
        files = ImageFiles(sweep.data_dir, [by_id[i] for i in needed])

        def chunk_done(chunk_ids, results, chunk_identity):
            store.save_chunk(chunk_ids, results, chunk_identity if need_identity else None)

        fan = run_trials(trials, files, objective, chunk_size=chunk_size, max_retries=ray_cluster.max_retries, keep=keep,
                         memory_budget=ray_cluster.memory_budget_bytes(), on_chunk_done=chunk_done, on_tick=on_tick,
                         identity=need_identity, known={t["trial"]: known_now.get(t["trial"], {}) for t in trials},
                         known_identity={i: identity[i] for i in needed if i in identity},
                         on_tail=report_imports_on_tail(context), watch=watch, resources=resources)
        identity.update(fan.identity)
        stats["decodes"] += fan.decodes
        out = {}
        for o in fan.outcomes:
            workers.setdefault(o.trial, []).extend(o.workers)
            res = dict(known_now.get(o.trial, {}))
            res.update(zip(o.image_ids, o.per_image))
            out[o.trial] = res
            stats["evaluations"] += sum(1 for i in o.image_ids if i not in known_now.get(o.trial, {}))
        return out

    def settled(outcome) -> None:
        if outcome.trial not in requested:
            return  # a trial of another partition, taking part in its round's halving through its record
        before = records_by_key.get(outcome.trial)
        reused = before is not None and outcome.trial not in recompute
        if reused:
            record = before
        else:
            outcome.workers = sorted(workers.pop(outcome.trial, []), key=lambda w: w["chunk"])
            record = outcome.to_record(sweep_name=sweep.name, fingerprint=store.fingerprint, metric=objective.metric,
                                       manifest_digest=digest)
            records_by_key[outcome.trial] = record
        save(record, reused)

    try:
        for r in search.rounds_of(keys):
            started = time.perf_counter()
            outcomes = search.run(r, records_by_key, evaluate, known, settled, requested=requested,
                                  recompute=recompute)
            kept = [o for o in outcomes if o.status == "ok"]
            stats["rounds"].append({"round": r, "trials": len(outcomes), "complete": len(kept),
                                    "pruned": sum(1 for o in outcomes if o.status == "pruned"),
                                    "seconds": round(time.perf_counter() - started, 3)})
            # (a run of some of a round's trials, a UI launch of one, say: the round is what ranked them)
            mine = [o for o in outcomes if o.trial in requested]
            part = f" (this run's {len(mine)}: {sum(1 for o in mine if o.status == 'ok')} complete)" \
                if len(mine) < len(outcomes) else ""
            context.log.info(f"round {r}: {len(outcomes)} trial(s), {len(kept)} complete, "
                             f"{stats['rounds'][-1]['pruned']} pruned in {stats['rounds'][-1]['seconds']:.2f}s{part}")
    except SearchError as exc:  # named trials; what settled is saved
        raise Failure(description=str(exc)) from None
    except ImageDataError as exc:  # named files; what settled is saved
        raise Failure(description=data_error_message(exc, sweep_dir)) from None
    finally:
        keep.clear()
    if need_identity and all(r.id in identity for r in images):
        baseline.save(identity[r.id] for r in images)
    store.clear_chunks()
    files = len(images) + sum(1 for r in images if r.target_path)
    stats["decodes_per_image"] = round(stats["decodes"] / max(1, files), 4)
    stats["spilled_bytes"] = spill.report(context.log)
    return stats
