"""Instance storage: Dagster's SQLite event log, writing a batch of asset events in one transaction.

A ranged run of ``experiment_results`` emits one planned-materialization event per trial when it starts
and one materialization event per trial when it ends. Dagster's SQLite event log stores each event on
its own: two new engines, two connections, two commits and a schema inspection per event, which adds up
over a sweep of many trials. Dagster already hands such events over as a batch when
``DAGSTER_EVENT_BATCH_SIZE`` is set, but its SQLite storage then stores them one by one anyway. This
storage writes the batch in one transaction per shard: the same rows in the same tables as the
one-by-one path (a batch's asset check events are mirrored into the index after its asset events).
Any batch it does not recognise takes the one-by-one path.

The project's ``dagster.yaml`` names ``ImgtuneInstance`` as its ``instance_class``: Dagster's own
instance, whose default SQLite storage (under the instance's folder, wherever that is: $DAGSTER_HOME,
or the temporary folder ``dagster`` uses without it) keeps its event log here. An instance without it
keeps Dagster's default storage and simply runs slower.

The base classes and the helpers this storage calls are Dagster's private API (``dagster._core``),
imported in one block below; a Dagster upgrade must re-check them (see
imgtune_assets_tests/test_pinned_private_apis.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import yaml
from dagster import DagsterInstance, EventLogEntry

# --- Dagster's private API: imported here only (pinned dagster==1.13.27; every name, method and
# signature used below is checked in imgtune_assets_tests/test_pinned_private_apis.py). Dagster has no
# public base class for an event log storage that writes to its own SQLite files.
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
from dagster._core.instance.ref import InstanceRef, _event_logs_directory
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlalchemy_compat import db_result
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClassData

# --- end of Dagster's private API

# Dagster reads this in every ``handle_new_event``; any size above a run's partition count keeps a
# run's planned (or materialized) events in one batch.
EVENT_BATCH_SIZE = "1000"


class BatchedSqliteEventLogStorage(SqliteEventLogStorage):
    """``SqliteEventLogStorage`` with a real ``store_event_batch``.

    Creating it turns Dagster's event batching on for the process (``DAGSTER_EVENT_BATCH_SIZE``, unless
    already set): the instance that uses this storage is the one whose events get batched.
    """

    def __init__(self, base_dir: str, inst_data: Optional[ConfigurableClassData] = None):
        super().__init__(base_dir=base_dir, inst_data=inst_data)
        os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", EVENT_BATCH_SIZE)

    @classmethod
    def from_config_value(cls, inst_data: Optional[ConfigurableClassData], config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        if not _is_one_run_of_asset_events(events):
            return super().store_event_batch(events)
        statements = [self.prepare_insert_event(event) for event in events]
        # A failure here commits nothing, and Dagster then stores the events one by one.
        with self.run_connection(events[0].run_id) as conn:
            for statement in statements:
                conn.execute(statement)
        # Past this point the run's log holds the events: raising would make Dagster store them all
        # again. Mirror the asset events in the cross-run index shard, as ``store_event`` does, in one
        # transaction; should that fail (the index locked by other runs beyond SQLite's 30 s wait), one
        # by one. Asset check events (a whole-sweep run plans its checks in the same batch) are
        # mirrored as ``store_event`` mirrors them.
        assets = [(e, s) for e, s in zip(events, statements) if e.dagster_event_type in ASSET_EVENTS]
        checks = [(e, s) for e, s in zip(events, statements) if e.dagster_event_type in ASSET_CHECK_EVENTS]
        try:
            with self.index_transaction() as conn:
                self._mirror(conn, [e for e, _ in assets], [s for _, s in assets])
        except Exception:  # noqa: BLE001 - retried event by event; a second failure raises
            for event, statement in assets:
                with self.index_transaction() as conn:
                    self._mirror(conn, [event], [statement])
        for event, statement in checks:
            with self.index_connection() as conn, db_result(conn, statement) as result:
                event_id = result.inserted_primary_key[0]
            self.store_asset_check_event(event, event_id)

    def _mirror(self, conn, events: Sequence[EventLogEntry], statements: Sequence[Any]) -> None:
        event_ids = []
        for statement in statements:
            with db_result(conn, statement) as result:
                event_ids.append(result.inserted_primary_key[0])
        self._store_asset_event_tags(conn, events, event_ids)
        # The asset table keeps one row per asset key that every event overwrites: storing the
        # last event of each (key, event type) leaves it as storing every event in turn would.
        last: dict[tuple[str, str], int] = {}
        for index, event in enumerate(events):
            key = event.get_dagster_event().asset_key
            last[(key.to_string() if key else "", event.dagster_event_type.value)] = index
        for index in sorted(last.values()):
            self._store_asset_event(conn, events[index], event_ids[index])


def _is_one_run_of_asset_events(events: Sequence[EventLogEntry]) -> bool:
    """Events of one run, each an asset or asset check event (what Dagster batches)."""
    return (
        len(events) > 1
        and len({event.run_id for event in events}) == 1
        and all(
            event.is_dagster_event and event.dagster_event_type in ASSET_EVENTS | ASSET_CHECK_EVENTS
            for event in events
        )
    )


class BatchedSqliteStorage(DagsterSqliteStorage):
    """Dagster's default SQLite storage (runs, event log, schedules under one folder), with the event
    log above."""

    def __init__(self, base_dir: str, inst_data: Optional[ConfigurableClassData] = None):
        super().__init__(base_dir, inst_data=inst_data)
        self._event_log_storage = BatchedSqliteEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data: Optional[ConfigurableClassData], config_value: Mapping[str, Any]):
        return cls.from_local(inst_data=inst_data, **config_value)


class ImgtuneInstance(DagsterInstance):
    """Dagster's instance; only its default storage differs: ``BatchedSqliteStorage`` in the instance's
    own folder. Anything ``dagster.yaml`` configures (``storage``, ``run_storage``, ...) wins as usual.

    A storage class named directly under ``event_log_storage`` would need its folder spelled out in
    ``dagster.yaml``; Dagster hands the folder only to the instance class's defaults.
    """

    @classmethod
    def config_schema(cls) -> dict:
        return {}

    @staticmethod
    def config_defaults(base_dir: str) -> Mapping[str, Optional[ConfigurableClassData]]:
        defaults = dict(InstanceRef.config_defaults(base_dir))
        defaults["storage"] = ConfigurableClassData(
            __name__, BatchedSqliteStorage.__name__, yaml.dump({"base_dir": base_dir}, default_flow_style=False))
        defaults["event_log_storage"] = ConfigurableClassData(
            __name__, BatchedSqliteEventLogStorage.__name__,
            yaml.dump({"base_dir": _event_logs_directory(base_dir)}, default_flow_style=False))
        return defaults
