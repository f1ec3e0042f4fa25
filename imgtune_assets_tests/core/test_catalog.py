"""The sweep catalog: which sweep files a code location serves, and when it refuses them all."""

from __future__ import annotations

import pytest

from imgtune_assets.core.catalog import (
    SWEEP_ENV,
    SWEEPS_DIR_ENV,
    SweepCatalogError,
    find_sweep,
    group_name,
    load_catalog,
    sweep_files,
    sweeps_from_environment,
)
from imgtune_assets.core.paths import BUNDLED_SWEEPS
from imgtune_assets.core.sweepfile import SweepFileError, load_sweep
from imgtune_assets_tests.conftest import write_sweep


@pytest.fixture
def folder(tmp_path):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    return sweeps


def test_group_name_replaces_everything_outside_word_characters():
    assert group_name("denoise-demo") == "denoise_demo"
    assert group_name("a.b-c_1") == "a_b_c_1"
    assert group_name("Plain_09") == "Plain_09"


def test_sweep_files_are_yaml_and_yml_in_name_order_and_hidden_ones_are_ignored(folder, denoise_data):
    write_sweep(folder / "b.yml", denoise_data, name="b")
    write_sweep(folder / "a.yaml", denoise_data, name="a")
    write_sweep(folder / "C.YAML", denoise_data, name="c")
    write_sweep(folder / ".hidden.yaml", denoise_data, name="hidden")
    write_sweep(folder / "notes.txt", denoise_data, name="txt")
    write_sweep(folder / "backup.yaml.bak", denoise_data, name="bak")
    (folder / "sub.yaml").mkdir()  # a folder, not a sweep file
    write_sweep(folder / "sub.yaml" / "nested.yaml", denoise_data, name="nested")

    assert [p.name for p in sweep_files(folder)] == ["C.YAML", "a.yaml", "b.yml"]
    assert [s.name for s in sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})] == ["c", "a", "b"]


def test_missing_sweeps_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SweepCatalogError, match="sweeps folder not found") as err:
        sweeps_from_environment({SWEEPS_DIR_ENV: str(missing)})
    assert str(missing) in str(err.value)


def test_a_sweep_file_with_a_duplicate_key_refuses_the_set(folder, denoise_data):
    write_sweep(folder / "a.yaml", denoise_data, name="a")
    bad = write_sweep(folder / "b.yaml", denoise_data, name="b")
    bad.write_text(bad.read_text() + "trials: 99\n")  # a second ``trials:``: PyYAML would keep this one
    with pytest.raises(SweepCatalogError) as err:
        sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})
    assert str(err.value).startswith(f"{bad}: line ") and "duplicate key 'trials' (first on line" in str(err.value)


def test_empty_sweeps_folder_is_refused(folder):
    (folder / ".hidden.yaml").write_text("name: x\n")
    (folder / "README.md").write_text("no sweeps here\n")
    with pytest.raises(SweepCatalogError, match=r"no sweep files \(\*\.yaml, \*\.yml\)") as err:
        sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})
    assert str(folder) in str(err.value)


def test_the_default_is_the_bundled_sweeps_folder():
    sweeps = sweeps_from_environment({})
    assert [s.name for s in sweeps] == ["denoise-demo", "segment-demo"]
    assert {s.path.parent for s in sweeps} == {BUNDLED_SWEEPS.resolve()}
    # blank values count as unset
    assert [s.name for s in sweeps_from_environment({SWEEP_ENV: "  ", SWEEPS_DIR_ENV: " "})] == \
        ["denoise-demo", "segment-demo"]


def test_one_sweep_file_wins_over_the_sweeps_folder(tmp_path, folder, denoise_data):
    write_sweep(folder / "a.yaml", denoise_data, name="a")
    write_sweep(folder / "b.yaml", denoise_data, name="b")
    alone = write_sweep(tmp_path / "alone.yaml", denoise_data, name="alone")
    [sweep] = sweeps_from_environment({SWEEP_ENV: str(alone), SWEEPS_DIR_ENV: str(folder)})
    assert sweep.name == "alone" and sweep.path == alone.resolve()


def test_a_missing_single_sweep_file_is_a_catalog_error(tmp_path):
    missing = tmp_path / "gone.yaml"
    with pytest.raises(SweepCatalogError, match="sweep file not found") as err:
        sweeps_from_environment({SWEEP_ENV: str(missing)})
    assert str(missing) in str(err.value)
    assert isinstance(err.value, SweepFileError)  # callers that handle sweep file errors handle this too


def test_two_files_with_the_same_name_are_refused_naming_both(folder, denoise_data):
    first = write_sweep(folder / "one.yaml", denoise_data, name="same")
    second = write_sweep(folder / "two.yaml", denoise_data, name="same")
    with pytest.raises(SweepCatalogError) as err:
        sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})
    message = str(err.value)
    assert f"{first} and {second}: both declare the sweep name 'same'" in message


def test_two_sweeps_applying_into_one_folder_are_refused_naming_both(folder, denoise_data, tmp_path):
    (tmp_path / "photos").mkdir()
    first = write_sweep(folder / "one.yaml", denoise_data, name="one",
                        apply={"input_dir": str(tmp_path / "photos"), "output_dir": str(tmp_path / "tuned")})
    second = write_sweep(folder / "two.yaml", denoise_data, name="two",  # the same folder, spelled another way
                         apply={"input_dir": str(tmp_path / "photos"), "output_dir": str(tmp_path / "x" / ".." / "tuned")})
    with pytest.raises(SweepCatalogError) as err:
        sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})
    assert f"{first} and {second}: both write their tuned images to" in str(err.value)
    assert "apply.output_dir" in str(err.value)
    write_sweep(second, denoise_data, name="two",
                apply={"input_dir": str(tmp_path / "photos"), "output_dir": str(tmp_path / "tuned-two")})
    assert [s.name for s in sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})] == ["one", "two"]


def test_one_bucket_path_at_two_s3_compatible_stores_is_two_output_folders(folder, denoise_data, tmp_path):
    (tmp_path / "photos").mkdir()

    def at(endpoint):
        return {"apply": {"input_dir": str(tmp_path / "photos"), "output_dir": "s3://photos/tuned"},
                "storage": {"endpoint_url": endpoint}}

    write_sweep(folder / "one.yaml", denoise_data, name="one", **at("http://127.0.0.1:9000"))
    second = write_sweep(folder / "two.yaml", denoise_data, name="two", **at("http://127.0.0.2:9000"))
    assert [s.name for s in sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})] == ["one", "two"]
    # the same endpoint spelled another way, or a default endpoint that may be it: one folder
    for endpoint in ("http://127.0.0.1:9000/", None):
        doc = at(endpoint) if endpoint else {"apply": at("x")["apply"]}
        write_sweep(second, denoise_data, name="two", **doc)
        with pytest.raises(SweepCatalogError, match="both write their tuned images to s3://photos/tuned"):
            sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})


def test_tuned_images_into_another_sweeps_data_folder_are_refused(folder, denoise_data, segment_data, tmp_path):
    (tmp_path / "photos").mkdir()
    write_sweep(folder / "denoise.yaml", denoise_data, name="denoise")
    bad = write_sweep(folder / "segment.yaml", segment_data, name="segment",
                      apply={"input_dir": str(tmp_path / "photos"), "output_dir": str(denoise_data / "images")})
    with pytest.raises(SweepCatalogError) as err:
        sweeps_from_environment({SWEEPS_DIR_ENV: str(folder)})
    assert f"{bad}: apply.output_dir {denoise_data / 'images'} is inside the data folder of" in str(err.value)


def test_names_that_map_to_the_same_group_are_refused(folder, denoise_data):
    dash = write_sweep(folder / "dash.yaml", denoise_data, name="a-b")
    under = write_sweep(folder / "under.yaml", denoise_data, name="a_b")
    with pytest.raises(SweepCatalogError) as err:
        load_catalog(sweep_files(folder))
    message = str(err.value)
    assert f"{dash} and {under}: both declare the asset group name 'a_b'" in message
    assert "sweep name" not in message  # the names themselves differ


def test_names_that_differ_only_in_case_are_refused(folder, denoise_data):
    # One output folder on a case-insensitive file system (macOS', Windows'): their trials would mix.
    lower = write_sweep(folder / "a.yaml", denoise_data, name="team-alpha")
    upper = write_sweep(folder / "b.yaml", denoise_data, name="TEAM-ALPHA")
    with pytest.raises(SweepCatalogError) as err:
        load_catalog(sweep_files(folder))
    assert f"{lower} and {upper}: both declare the sweep name but for case 'team-alpha' / 'TEAM-ALPHA'" \
        in str(err.value)


def test_a_broken_link_among_the_sweep_files_is_named(folder, denoise_data):
    write_sweep(folder / "a.yaml", denoise_data, name="a")
    (folder / "gone.yaml").symlink_to(folder / "elsewhere" / "gone.yaml")
    with pytest.raises(SweepCatalogError) as err:
        sweep_files(folder)
    assert str(err.value) == (f"{folder / 'gone.yaml'}: a broken symbolic link (to {folder / 'elsewhere' / 'gone.yaml'}): "
                              "point it at a sweep file, or remove it")


def test_every_problem_is_reported_at_once(folder, denoise_data):
    write_sweep(folder / "a.yaml", denoise_data, name="dup")
    write_sweep(folder / "b.yaml", denoise_data, name="dup")
    bad = write_sweep(folder / "c.yaml", denoise_data, name="bad", trials=0)
    good = write_sweep(folder / "d.yaml", denoise_data, name="good")
    with pytest.raises(SweepCatalogError) as err:
        load_catalog(sweep_files(folder))
    lines = str(err.value).splitlines()
    assert f"{bad}: trials: must be between 1 and 10000, got 0" in lines
    assert any(line.startswith(f"{folder / 'a.yaml'} and {folder / 'b.yaml'}: both declare the sweep name 'dup'")
               for line in lines)
    assert str(good) not in str(err.value)
    # a good file on its own loads
    assert [s.name for s in load_catalog([good])] == ["good"]


def test_find_sweep_by_name_and_the_error_lists_the_names(tmp_path, denoise_data):
    sweeps = [load_sweep(write_sweep(tmp_path / f"{n}.yaml", denoise_data, name=n)) for n in ("alpha", "beta")]
    assert find_sweep(sweeps, "beta") is sweeps[1]
    with pytest.raises(SweepCatalogError, match=r"no sweep named 'gamma' \(known: alpha, beta\)"):
        find_sweep(sweeps, "gamma")
    with pytest.raises(SweepCatalogError, match=r"no sweep named 'gamma' \(known: none\)"):
        find_sweep([], "gamma")
