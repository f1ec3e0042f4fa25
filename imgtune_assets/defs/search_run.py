"""The experiment step of a staged sweep (adaptive sampler or early stopping): its rounds run on the
Ray fan-out inside the one ranged run that evaluates the sweep. The search itself (proposals, ledger,
successive halving) is ``core/search.py``; this module wires it to the asset's store, Ray and logs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from dagster import AssetExecutionContext, Failure

from imgtune_assets.core.manifest import ManifestRow, usable
from imgtune_assets.core.report import prepare_in_background
from imgtune_assets.core.results import IdentityBaseline, TrialStore
from imgtune_assets.core.sampling import search_space, space_digest, trial_key, trial_keys
from imgtune_assets.core.search import Ledger, Search, SearchError, image_detail, is_staged
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.executor import steps_share_the_run_process
from imgtune_assets.defs.resources import RayResource


# The proposal sources of trials that an adaptive sampler chose (TPE's batches take a Gaussian-process share).
LEARNT_SOURCES = {"tpe": ("tpe", "gp"), "cmaes": ("cmaes",)}


def early_stopping_notes(sweep: Sweep, n_images: int, records: Sequence[dict[str, Any]] = ()) -> list[str]:
    """What the user should know about how the sweep searches on ``n_images`` images: early stopping that
    stops nothing, and (given the trials' ``records``) an adaptive sampler that proposed no trial, every
    one being from the initial design; logged as warnings, and kept in the report."""
    reason = sweep.early_stopping.inactive_reason(n_images) if sweep.early_stopping else None
    notes = [reason] if reason else []
    learnt = LEARNT_SOURCES.get(sweep.sampler)
    # only once every trial has a result: a range that ran round 0 alone has not reached the learning yet
    if learnt and len(records) >= sweep.trials and not any(r.get("source") in learnt for r in records):
        first = sum(1 for r in records if r.get("round") == 0)
        every = "the only trial is" if len(records) == 1 else f"all {len(records)} trials are"
        notes.append(f"sampler {sweep.sampler}: {every} the initial design (round 0 holds "
                     f"{first}); none was proposed by {sweep.sampler} — raise trials above {first} (or lower "
                     f"search.n_startup) for the search to learn from results")
    return notes


def repeated_trials_note(sweep: Sweep, trials: Sequence[dict[str, Any]]) -> str | None:
    """A fixed design (``grid``, ``random``...) over a space with fewer distinct points than trials gives
    some trials the parameters of an earlier one: they cost as much and say nothing new. None when every
    trial's parameters are its own, or the trials are proposed as the search goes (``is_staged``)."""
    if is_staged(sweep):
        return None
    seen: set[str] = set()
    repeats = 0
    for trial in trials:
        if trial.get("params") is None:
            continue
        key = json.dumps(trial["params"], sort_keys=True, default=str)
        repeats += key in seen
        seen.add(key)
    if not repeats:
        return None
    advice = (f"lower trials to {len(seen)}, or widen the space" if sweep.sampler == "grid" else
              "widen the space, or use sampler grid to try each distinct pipeline once")
    return (f"{repeats} of the {len(trials)} trials {'repeats' if repeats == 1 else 'repeat'} the parameters of "
            f"an earlier trial (sampler {sweep.sampler}: the search space gives {len(seen)} distinct pipelines "
            f"here): {advice}")


def reuse_message(reused: int, total: int) -> str:
    """The experiment step's log line when it runs with ``skip_finished`` (a resumed sweep)."""
    return f"reusing {reused} finished trial(s) (skip_finished), computing {total - reused} of {total}"


def partial_reuse_message(known: dict[str, dict[str, Any]], keys: Sequence[str]) -> str | None:
    """With ``skip_finished``, what the chunks an interrupted run saved (``known``: trial -> image ->
    result) spare the trials ``keys`` still to compute; None when they spare nothing."""
    saved = {k: len(known[k]) for k in keys if known.get(k)}
    if not saved:
        return None
    return (f"reusing {sum(saved.values())} saved image evaluation(s) of {len(saved)} unfinished trial(s) "
            "(skip_finished)")


def report_imports_on_tail(context: AssetExecutionContext) -> Callable[[], object] | None:
    """``run_trials``' ``on_tail``: the report step's imports, begun while the fan-out's last tasks run —
    when that step runs in this process (the run's job has the in-process executor), else nothing."""
    return prepare_in_background if steps_share_the_run_process(context.job_def.executor_def) else None


def staged_trials(sweep: Sweep, sweep_dir: Path, manifest_digest: str) -> list[dict[str, Any]]:
    """``run_settings``' trial list for a staged sweep: the recorded proposals where the ledger has them;
    the others are proposed by the experiment step, from the results of the rounds before theirs."""
    try:
        ledger = Ledger(Path(sweep_dir) / "search", sweep.fingerprint(), manifest_digest)
    except SearchError:  # a damaged ledger is reported by the experiment step, which needs it
        ledger = None
    recorded = ledger.proposals() if ledger is not None and ledger.started else {}
    out = []
    for k in range(sweep.trials):
        p = recorded.get(k)
        out.append({"trial": trial_key(k), "index": k, "params": p["params"] if p else None,
                    "round": p["round"] if p else None, "source": p["source"] if p else None})
    return out


def warm_start_params(sweep: Sweep, sweep_dir: Path, manifest_digest: str) -> list[dict[str, Any]]:
    """The top parameter sets of the sweep's last report, when it was made for other images and the
    same search space (a sweep run again after its images changed starts from them)."""
    file = Path(sweep_dir) / "report.json"
    if not file.exists():
        return []
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError:
        return []
    if not isinstance(report, dict):  # not a report this code wrote: nothing to start from
        return []
    if report.get("manifest_digest") in (None, manifest_digest):
        return []
    if report.get("space_digest") != space_digest(search_space(sweep)):
        return []
    return [p for p in report.get("top_params") or [] if isinstance(p, dict)]


def run_staged_search(context: AssetExecutionContext, sweep: Sweep, sweep_dir: Path, store: TrialStore,
                      rows: list[ManifestRow], keys: list[str], skip_finished: bool, ray_cluster: RayResource,
                      save: Callable[[dict, bool], None], on_tick: Callable[[], None],
                      on_plan: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run the rounds that hold ``keys``; each settled trial goes to ``save(record, reused)``, and
    ``on_tick`` is called at least every second while Ray works; with successive halving, ``on_plan``
    first gets the images a trial is expected to be scored on. Returns the step's statistics (also
    written to ``last_experiment_run.json``)."""
    from imgtune_assets.core.fanout import OBJECT_STORE_SHARE, DecodedChunks, ImageDataError, ImageFiles, \
        data_error_message, plan_chunks, run_trials
    from imgtune_assets.core.manifest import decoded_bytes

    objective = sweep.objective
    digest = store.manifest_digest
    images = usable(rows)
    by_id = {r.id: r for r in images}
    try:
        records, _ = store.load_all(trial_keys(sweep))
    except ValueError as exc:
        raise Failure(description=str(exc)) from None
    records_by_key = {r["trial"]: r for r in records}
    requested = set(keys)
    recompute = set() if skip_finished else requested
    if skip_finished:  # (a requested trial with a current result is reused when its round settles)
        context.log.info(reuse_message(sum(1 for k in requested if k in records_by_key), len(requested)))
    ray_cluster.connect(context.log)
    import ray

    resources = ray.cluster_resources()
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

    def evaluate(trials, ids, known_now):
        needed = [i for i in ids if any(i not in known_now.get(t["trial"], {}) for t in trials)
                  or (need_identity and i not in identity)]
        files = ImageFiles(sweep.data_dir, [by_id[i] for i in needed])

        def chunk_done(chunk_ids, results, chunk_identity):
            store.save_chunk(chunk_ids, results, chunk_identity if need_identity else None)

        fan = run_trials(trials, files, objective, chunk_size=chunk_size, max_retries=ray_cluster.max_retries, keep=keep,
                         memory_budget=ray_cluster.memory_budget_bytes(), on_chunk_done=chunk_done, on_tick=on_tick,
                         identity=need_identity, known={t["trial"]: known_now.get(t["trial"], {}) for t in trials},
                         known_identity={i: identity[i] for i in needed if i in identity},
                         on_tail=report_imports_on_tail(context))
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
            context.log.info(f"round {r}: {len(outcomes)} trial(s), {len(kept)} complete, "
                             f"{stats['rounds'][-1]['pruned']} pruned in {stats['rounds'][-1]['seconds']:.2f}s")
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
    return stats
