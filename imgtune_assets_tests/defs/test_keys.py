"""Asset keys of a sweep: ``<sweep name>/<asset>``."""

import pytest
from dagster import AssetKey

from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.keys import ASSET_NAMES, OPTIONAL_ASSET_NAMES, asset_key
from imgtune_assets_tests.support.sweeps import write_sweep


def test_a_key_is_the_sweep_name_then_the_asset_whether_given_a_sweep_or_its_name(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "data", name="den-oise.v2"))
    for name in ASSET_NAMES + OPTIONAL_ASSET_NAMES:
        assert asset_key(sweep, name) == asset_key("den-oise.v2", name) == AssetKey(["den-oise.v2", name])
    assert asset_key(sweep, "sweep_report").to_user_string() == "den-oise.v2/sweep_report"


def test_an_unknown_asset_name_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown imgtune asset 'experiment_result' \(known: image_manifest, "
                                         r"run_settings, experiment_results, sweep_report, tuned_images\)"):
        asset_key("s", "experiment_result")
