"""A sweeps folder served by a running ``dagster-webserver`` (``IMGTUNE_SWEEPS_DIR``): a sweep file
added to the folder is picked up by *Reload definitions* (GraphQL ``reloadRepositoryLocation``) with
its assets, schedule and sensor, without restarting the webserver; a file that repeats a sweep name
turns the reload into a load error naming both files, and removing it brings everything back."""

from __future__ import annotations

import pytest

from imgtune_assets.core.catalog import group_name
from imgtune_assets.defs.keys import ASSET_NAMES
from imgtune_assets_tests.support import start_webserver, sweeps_dir_env, write_sweep

FIRST, SECOND = "first", "second-sweep"  # groups first, second_sweep

SERVED = """
{
  assetNodes { assetKey { path } groupName }
  repositoriesOrError { __typename ... on RepositoryConnection { nodes {
    name location { name }
    jobs { name } schedules { name cronSchedule } sensors { name }
  } } }
}"""


def served(web) -> dict[str, set]:
    """What the webserver serves now: asset keys (``sweep/asset``), jobs, schedules and sensors."""
    data = web.graphql(SERVED)
    repos = data["repositoriesOrError"]
    assert repos["__typename"] == "RepositoryConnection", repos
    names = lambda kind: {n["name"] for repo in repos["nodes"] for n in repo[kind]}  # noqa: E731
    return {
        "assets": {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"]},
        "groups": {n["groupName"] for n in data["assetNodes"]},
        "jobs": {j for j in names("jobs") if not j.startswith("__")},  # (Dagster's implicit asset job)
        "schedules": names("schedules"),
        "sensors": names("sensors"),
    }


def expected(*sweeps: str) -> dict[str, set]:
    groups = [group_name(s) for s in sweeps]
    return {
        "assets": {f"{s}/{a}" for s in sweeps for a in ASSET_NAMES},
        "groups": set(groups),
        "jobs": {f"{g}_{kind}" for g in groups for kind in ("sweep", "trials")},
        "schedules": {f"{g}_nightly_sweep" for g in groups},
        "sensors": {f"{g}_new_images" for g in groups},
    }


def error_text(entry: dict) -> str:
    error = entry["locationOrLoadError"]
    return "\n".join([error.get("message") or ""] + [c.get("message") or "" for c in error.get("causes") or []])


@pytest.fixture
def served_folder(tmp_path, denoise_data):
    sweeps = tmp_path / "sweeps"
    write_sweep(sweeps / "first.yaml", denoise_data, name=FIRST, trials=2)
    web = start_webserver(sweeps_dir_env(tmp_path, sweeps), tmp_path / "webserver.log")
    try:
        yield sweeps, web
    finally:
        web.stop()


def test_reload_serves_a_new_sweep_file_and_reports_a_duplicate_name(served_folder, denoise_data):
    sweeps, web = served_folder
    location = web.wait_for_location()
    assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation", location
    name, pid = location["name"], web.pid
    assert served(web) == expected(FIRST)

    # A second sweep file appears in the folder: Reload definitions serves it, same webserver process.
    write_sweep(sweeps / "second.yaml", denoise_data, name=SECOND, trials=3)
    entry = web.reload_location(name)
    assert entry["__typename"] == "WorkspaceLocationEntry", entry
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", error_text(entry)
    assert served(web) == expected(FIRST, SECOND)
    assert web.pid == pid and web.service.alive(), web.tail()

    # A third file repeats the second's name: the reload is a load error naming both files.
    write_sweep(sweeps / "third.yaml", denoise_data, name=SECOND, trials=2)
    entry = web.reload_location(name)
    assert entry["__typename"] == "WorkspaceLocationEntry", entry
    assert entry["locationOrLoadError"]["__typename"] == "PythonError", entry
    message = error_text(entry)
    assert str(sweeps.resolve() / "second.yaml") in message and str(sweeps.resolve() / "third.yaml") in message, message
    assert repr(SECOND) in message, message
    assert [e["locationOrLoadError"]["__typename"] for e in web.locations()] == ["PythonError"]
    assert web.pid == pid and web.service.alive(), web.tail()

    # The fix (remove the file) and another reload bring everything back.
    (sweeps / "third.yaml").unlink()
    entry = web.reload_location(name)
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", error_text(entry)
    assert served(web) == expected(FIRST, SECOND)
    assert web.pid == pid and web.service.alive(), web.tail()
