"""BatchedSqliteEventLogStorage: a batch of asset events stored in one transaction leaves the same rows
as Dagster's one-by-one path, and a ranged run on an instance configured with it is complete."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    BackfillPolicy,
    DagsterEventType,
    DagsterInstance,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from imgtune_assets.defs import storage
from imgtune_assets.defs.storage import BatchedSqliteEventLogStorage

KEYS = [f"p{i}" for i in range(6)]
parts = StaticPartitionsDefinition(KEYS)


@asset(partitions_def=parts, backfill_policy=BackfillPolicy.single_run())
def ranged(context) -> None:
    for key in context.partition_keys:
        context.add_asset_metadata({"value": int(key[1:])}, partition_key=key)


def _instance(home: Path, monkeypatch) -> DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the storage's default folder, as under `dagster`
    (home / "dagster.yaml").write_text(
        "event_log_storage:\n  module: imgtune_assets.defs.storage\n  class: BatchedSqliteEventLogStorage\n"
        "telemetry:\n  enabled: false\n")
    return DagsterInstance.from_config(str(home))


def _ranged_run(instance: DagsterInstance):
    return materialize([ranged], instance=instance, tags={
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
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    yield


def test_a_batch_leaves_the_same_rows_as_one_by_one(tmp_path, monkeypatch, isolated_batch_size):
    source = _instance(tmp_path / "source", monkeypatch)
    run = _ranged_run(source)
    assert run.success
    events = source.all_logs(run.run_id)
    planned = [e for e in events if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION_PLANNED]
    materialized = [e for e in events if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION]
    assert len(planned) == len(materialized) == len(KEYS)

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
    instance = _instance(tmp_path / "home", monkeypatch)
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
    assert ["ASSET_MATERIALIZATION_PLANNED"] * len(KEYS) in batches
    assert ["ASSET_MATERIALIZATION"] * len(KEYS) in batches
    assert instance.get_materialized_partitions(AssetKey("ranged")) == set(KEYS)
    records = instance.fetch_materializations(AssetKey("ranged"), limit=100).records
    values = {r.partition_key: r.asset_materialization.metadata["value"].value for r in records}
    assert values == {key: int(key[1:]) for key in KEYS}


def test_base_dir_defaults_to_dagster_home(tmp_path, monkeypatch, isolated_batch_size):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    made = BatchedSqliteEventLogStorage.from_config_value(None, {})
    assert Path(made._base_dir) == tmp_path / "history" / "runs"
    monkeypatch.delenv("DAGSTER_HOME")
    with pytest.raises(ValueError, match="base_dir"):
        BatchedSqliteEventLogStorage.from_config_value(None, {})
