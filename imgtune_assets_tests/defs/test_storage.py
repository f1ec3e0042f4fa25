"""The project's instance (ImgtuneInstance, BatchedSqliteEventLogStorage): a batch of asset events stored
in one transaction leaves the same rows as Dagster's one-by-one path, a ranged run on it is complete,
and its storage lives in the instance's own folder whatever DAGSTER_HOME says."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from dagster import (
    AssetCheckResult,
    AssetKey,
    BackfillPolicy,
    DagsterEventType,
    DagsterInstance,
    StaticPartitionsDefinition,
    asset,
    asset_check,
    materialize,
)
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from imgtune_assets.defs import storage
from imgtune_assets.defs.storage import BatchedSqliteEventLogStorage, ImgtuneInstance
from imgtune_assets_tests.conftest import PROJECT
from imgtune_assets_tests.support.instances import open_project_instance

KEYS = [f"p{i}" for i in range(6)]
parts = StaticPartitionsDefinition(KEYS)


@asset(partitions_def=parts, backfill_policy=BackfillPolicy.single_run())
def ranged(context) -> None:
    for key in context.partition_keys:
        context.add_asset_metadata({"value": int(key[1:])}, partition_key=key)


@asset_check(asset=ranged)
def ranged_is_fine() -> AssetCheckResult:
    return AssetCheckResult(passed=True)


def _instance(home: Path) -> DagsterInstance:
    """An instance on the project's own dagster.yaml, opened without DAGSTER_HOME pointing at it."""
    return open_project_instance(home)


def _ranged_run(instance: DagsterInstance):
    # The check is planned in the same batch as the asset's partitions, as in a whole-sweep run.
    return materialize([ranged, ranged_is_fine], instance=instance, tags={
        ASSET_PARTITION_RANGE_START_TAG: KEYS[0], ASSET_PARTITION_RANGE_END_TAG: KEYS[-1]})


def _dump(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table, ids included (both paths must number events alike); only the
    wall-clock times of schema set-up differ between two databases."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        out = {}
        for table in tables:
            columns = [r[1] for r in conn.execute(f'pragma table_info("{table}")')]
            keep = ", ".join(f'"{c}"' for c in columns if c not in ("create_timestamp", "update_timestamp", "migration_completed"))
            out[table] = sorted(conn.execute(f'select {keep} from "{table}"').fetchall(), key=repr)
        return out


@pytest.fixture
def isolated_batch_size(monkeypatch):
    """No DAGSTER_EVENT_BATCH_SIZE during the test, and none left behind by the storage after it."""
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "0")  # recorded as unset or as it was, for undo
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE")
    yield


def test_a_batch_leaves_the_same_rows_as_one_by_one(tmp_path, monkeypatch, isolated_batch_size):
    source = _instance(tmp_path / "source")
    run = _ranged_run(source)
    assert run.success
    events = source.all_logs(run.run_id)
    planned = [e for e in events if e.dagster_event_type in (
        DagsterEventType.ASSET_MATERIALIZATION_PLANNED, DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED)]
    materialized = [e for e in events if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION]
    assert len(planned) == len(KEYS) + 1 and len(materialized) == len(KEYS)

    one_by_one = BatchedSqliteEventLogStorage(str(tmp_path / "one"))
    batched = BatchedSqliteEventLogStorage(str(tmp_path / "batch"))
    for event in planned + materialized:
        one_by_one.store_event(event)
    batched.store_event_batch(planned)
    batched.store_event_batch(materialized)

    for shard in ("index.db", f"{run.run_id}.db"):
        expected, got = _dump(tmp_path / "one" / shard), _dump(tmp_path / "batch" / shard)
        assert expected["event_logs"], shard
        assert got == expected, shard
    record = batched.get_asset_records([AssetKey("ranged")])[0].asset_entry
    assert record.last_materialization.dagster_event.partition == materialized[-1].dagster_event.partition


def test_a_ranged_run_writes_its_events_as_batches(tmp_path, monkeypatch, isolated_batch_size):
    instance = _instance(tmp_path / "home")
    assert isinstance(instance, ImgtuneInstance)
    assert isinstance(instance.event_log_storage, BatchedSqliteEventLogStorage)
    assert storage.os.environ["DAGSTER_EVENT_BATCH_SIZE"] == storage.EVENT_BATCH_SIZE

    batches: list[list[str]] = []
    real = BatchedSqliteEventLogStorage.store_event_batch

    def recording(self, events):
        batches.append([e.dagster_event_type.value for e in events])
        return real(self, events)

    monkeypatch.setattr(BatchedSqliteEventLogStorage, "store_event_batch", recording)
    run = _ranged_run(instance)
    assert run.success
    assert sorted(next(b for b in batches if "ASSET_MATERIALIZATION_PLANNED" in b)) == sorted(
        ["ASSET_MATERIALIZATION_PLANNED"] * len(KEYS) + ["ASSET_CHECK_EVALUATION_PLANNED"])
    assert ["ASSET_MATERIALIZATION"] * len(KEYS) in batches
    assert instance.get_materialized_partitions(AssetKey("ranged")) == set(KEYS)
    records = instance.fetch_materializations(AssetKey("ranged"), limit=100).records
    values = {r.partition_key: r.asset_materialization.metadata["value"].value for r in records}
    assert values == {key: int(key[1:]) for key in KEYS}


def test_the_storage_lives_in_the_instance_folder_whatever_dagster_home_says(tmp_path, monkeypatch,
                                                                             isolated_batch_size):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    instance = _instance(tmp_path / "home")
    assert _ranged_run(instance).success
    assert list((tmp_path / "home" / "history" / "runs").glob("*.db"))
    assert not (tmp_path / "elsewhere").exists()
    # A process that re-opens the instance from its ref (a run worker, a step on Ray) finds it there too.
    monkeypatch.delenv("DAGSTER_HOME")
    reopened = DagsterInstance.from_ref(instance.get_ref())
    assert reopened.get_materialized_partitions(AssetKey("ranged")) == set(KEYS)


def test_without_dagster_home_the_temporary_instance_uses_the_project_config(tmp_path, isolated_batch_size):
    # What `dagster asset materialize` does in the project folder when DAGSTER_HOME is unset.
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path), config_dir=str(PROJECT)))
    assert isinstance(instance.event_log_storage, BatchedSqliteEventLogStorage)
    assert _ranged_run(instance).success
    assert list((tmp_path / "history" / "runs").glob("*.db"))
