"""Trial partitions: one static partition per trial, decided by the sweep file."""

from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets_tests.support.sweeps import write_sweep


def test_one_partition_per_trial_in_the_sweep_files_order(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "data", trials=12))
    keys = trial_partitions(sweep).get_partition_keys()
    assert keys == trial_keys(sweep) == [f"trial-{k:03d}" for k in range(12)]


def test_more_trials_keep_the_earlier_partitions_and_add_after_them(tmp_path):
    few = trial_partitions(load_sweep(write_sweep(tmp_path / "a.yaml", tmp_path / "data", trials=3)))
    more = trial_partitions(load_sweep(write_sweep(tmp_path / "b.yaml", tmp_path / "data", trials=1001)))
    assert more.get_partition_keys()[:3] == few.get_partition_keys()
    # The partitions keep the trials' order past a thousand, where the names no longer sort so: a range
    # (first...last) is a slice of this order.
    assert more.get_partition_keys()[-2:] == ["trial-999", "trial-1000"]
