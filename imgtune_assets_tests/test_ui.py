"""The Dagster UI tells the story: a real ``dagster-webserver`` + ``dagster-daemon`` over a temporary
instance, serving a folder of two small sweeps (``IMGTUNE_SWEEPS_DIR``): ``ui-demo`` (a finished sweep,
materialized with the real CLI, then one trial again) and ``ui-blur`` (never run). Checked through
GraphQL and in headless Chromium (Debian's, driven by Playwright): two asset groups, each with its own
lineage under its own key prefix.

Runs launched from the UI go through the project's run queue (QueuedRunCoordinator, as in
production), so the daemon runs here too.

Screenshots: ``<tmp>/screenshots/`` and, for humans, ``.artifacts/ui/`` in the project (gitignored).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.defs.keys import ASSET_NAMES, asset_key
from imgtune_assets_tests.support import (
    MODULE,
    PROJECT,
    VENV_BIN,
    dagster_cli,
    materializations_by_partition,
    run_checked,
    runs,
    start_daemon,
    start_webserver,
    stop_all,
    sweeps_dir_env,
    wait_for,
    wait_for_run,
    write_sweep,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SWEEP, OTHER = "ui-demo", "ui-blur"  # groups ui_demo, ui_blur
TRIALS = ["trial-000", "trial-001", "trial-002", "trial-003"]
ARTIFACTS = PROJECT / ".artifacts" / "ui"
LINEAGE = {  # each sweep's own: asset -> its upstream assets, all under the sweep's prefix
    "image_manifest": [],
    "run_settings": ["image_manifest"],
    "experiment_results": ["run_settings"],
    "sweep_report": ["experiment_results", "run_settings"],
}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    make_denoise_set(tmp / "data", count=6, size=96)
    sweeps = tmp / "sweeps"
    write_sweep(sweeps / "ui-demo.yaml", tmp / "data", name=SWEEP, trials=len(TRIALS))
    write_sweep(sweeps / "ui-blur.yaml", tmp / "data", name=OTHER, trials=2, pipeline=[
        {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7}, "sigma": 1.0}])
    env = sweeps_dir_env(tmp, sweeps)
    # One sweep as a user runs it from the CLI (manifest+settings, every trial as one ranged run, report),
    # then one trial again on its own.
    started = time.monotonic()
    run_checked([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "sweep", SWEEP, "--quiet"], env)
    dagster_cli(["asset", "materialize", "-m", MODULE, "--select", f"{SWEEP}/experiment_results",
                 "--partition", "trial-001"], env)
    print(f"\nCLI: sweep + one-trial re-run in {time.monotonic() - started:.1f}s")
    shots = tmp / "screenshots"
    shots.mkdir()
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])  # (already initialized by the CLI runs)
    # The runs made by the CLI, before the UI is up: tests that launch runs from the UI add more later,
    # in whatever order the tests run.
    cli_runs = {run.run_id for run in instance.get_runs()}
    daemon = start_daemon(env, tmp / "daemon.log")
    web = None
    try:
        web = start_webserver(env, tmp / "webserver.log")
        location = web.wait_for_location()
        assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation", location
        yield {"env": env, "web": web, "daemon": daemon, "instance": instance, "shots": shots, "cli_runs": cli_runs}
    finally:
        instance.dispose()
        stop_all(*(service for service in (web, daemon) if service is not None))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy2(shot, ARTIFACTS / shot.name)


def test_cli_backfills_one_range_run_and_a_rerun_trial_keeps_its_history(ui):
    instance, cli_runs = ui["instance"], ui["cli_runs"]
    # The CLI's materializations only: a test that materializes from the UI may have run before this one.
    by_partition = {partition: [r for r in records if r.run_id in cli_runs] for partition, records in
                    materializations_by_partition(instance, asset_key(SWEEP, "experiment_results")).items()}
    assert sorted(by_partition) == TRIALS
    assert {k: len(v) for k, v in by_partition.items()} == {"trial-000": 1, "trial-001": 2, "trial-002": 1,
                                                           "trial-003": 1}
    # the range was ONE run; the re-run of trial-001 is another, newer one
    range_runs = {by_partition[k][0].run_id for k in ("trial-000", "trial-002", "trial-003")}
    assert len(range_runs) == 1
    newest, oldest = by_partition["trial-001"]  # newest first
    assert oldest.run_id in range_runs and newest.run_id not in range_runs
    run = instance.get_run_by_id(newest.run_id)
    assert run.tags["dagster/partition"] == "trial-001"
    # the other sweep of the folder was served, not run
    for name in ASSET_NAMES:
        assert instance.get_latest_materialization_event(asset_key(OTHER, name)) is None, name


ASSET_NODES = """{ assetNodes { assetKey { path } dependencyKeys { path } groupName partitionDefinition { type } } }"""
MATERIALIZATIONS = """
query Mats($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset {
      assetMaterializations(limit: 100) {
        partition runId
        metadataEntries {
          label __typename
          ... on FloatMetadataEntry { floatValue }
          ... on JsonMetadataEntry { jsonString }
          ... on MarkdownMetadataEntry { mdStr }
          ... on TableMetadataEntry { table { records schema { columns { name } } } }
        }
      }
    }
  }
}"""


def _materializations(web, sweep: str, name: str) -> list[dict]:
    return web.graphql(MATERIALIZATIONS, {"path": [sweep, name]})["assetOrError"]["assetMaterializations"]


def test_graphql_shows_two_groups_each_with_its_own_lineage(ui):
    web = ui["web"]
    nodes = {tuple(n["assetKey"]["path"]): n for n in web.graphql(ASSET_NODES)["assetNodes"]}
    assert sorted(nodes) == sorted((sweep, name) for sweep in (SWEEP, OTHER) for name in ASSET_NAMES)
    for sweep in (SWEEP, OTHER):
        mine = {path[1]: node for path, node in nodes.items() if path[0] == sweep}
        # every dependency stays inside the sweep's own prefix: two separate lineages
        deps = {name: sorted(tuple(d["path"]) for d in node["dependencyKeys"]) for name, node in mine.items()}
        assert deps == {name: [(sweep, up) for up in ups] for name, ups in LINEAGE.items()}, sweep
        assert {n["groupName"] for n in mine.values()} == {group_name(sweep)}
        assert mine["experiment_results"]["partitionDefinition"]["type"] == "STATIC"
        assert all(n["partitionDefinition"] is None for name, n in mine.items() if name != "experiment_results")


def test_graphql_shows_trial_partitions_and_the_report(ui):
    web = ui["web"]
    # one materialization per trial partition from the ranged run, each with its score and parameters
    trials = _materializations(web, SWEEP, "experiment_results")
    range_run = next(m["runId"] for m in trials if m["partition"] == "trial-000")
    from_range = [m for m in trials if m["runId"] == range_run]
    assert sorted(m["partition"] for m in from_range) == TRIALS
    for mat in from_range:
        entries = {e["label"]: e for e in mat["metadataEntries"]}
        assert entries["score"]["__typename"] == "FloatMetadataEntry" and entries["score"]["floatValue"] > 20
        assert entries["params"]["__typename"] == "JsonMetadataEntry" and "bilateral_filter.d" in entries["params"]["jsonString"]

    [report] = _materializations(web, SWEEP, "sweep_report")[:1]
    entries = {e["label"]: e for e in report["metadataEntries"]}
    assert entries["best_score"]["__typename"] == "FloatMetadataEntry"
    assert entries["best_score"]["floatValue"] == max(
        e["floatValue"] for m in trials for e in m["metadataEntries"] if e["label"] == "score")
    assert entries["top_10"]["__typename"] == "TableMetadataEntry"
    assert len(entries["top_10"]["table"]["records"]) == len(TRIALS)
    assert {"trial", "score"} <= {c["name"] for c in entries["top_10"]["table"]["schema"]["columns"]}
    assert entries["plots"]["__typename"] == "MarkdownMetadataEntry"
    assert entries["plots"]["mdStr"].count("](data:image/png;base64,") >= 2  # the charts
    assert entries["plots"]["mdStr"].count("](data:image/jpeg;base64,") == 1  # the before/after photographs
    assert _materializations(web, OTHER, "sweep_report") == []


@pytest.fixture
def browser_page(ui):
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
        finally:
            browser.close()
    assert not errors, f"page errors in the UI: {errors}"


def _open(page, url: str, ready_text: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
    page.get_by_text(ready_text).first.wait_for()
    skip = page.get_by_role("button", name="Skip")  # "Join the Dagster community" on a fresh profile
    try:
        skip.wait_for(state="visible", timeout=2_000)
        shown = True
    except PlaywrightTimeout:  # no dialog (nux disabled in dagster.yaml): nothing to skip
        shown = False
    if shown:
        skip.click()  # a dialog that is there but cannot be dismissed fails the test
    page.wait_for_load_state("networkidle")


def _settled(page) -> None:
    """Wait until no CSS animation or transition runs (a dialog fading in, a popover closing)."""
    page.wait_for_function("() => document.getAnimations().every(a => a.playState !== 'running')")


def _button(scope, text: str):
    """A button by its visible text (Dagster's icons add their own names to the accessible name)."""
    return scope.locator("button", has_text=re.compile(rf"^\s*{re.escape(text)}\s*$")).first


def _asset_links(page) -> set[tuple[str, str]]:
    """(sweep, asset) of every link to an asset page on the page."""
    hrefs = page.evaluate("Array.from(document.querySelectorAll('a[href*=\"/assets/\"]')).map(a => a.getAttribute('href'))")
    found = set()
    for href in hrefs:
        match = re.search(r"/assets/([^/?#]+)/([^/?#]+)", href)
        if match:
            found.add((match.group(1), match.group(2)))
    return found


def test_browser_shows_two_groups_each_with_its_own_lineage(ui, browser_page):
    page, web, shots = browser_page, ui["web"], ui["shots"]
    location = web.locations()[0]["name"]

    # The global lineage: one collapsed box per asset group, and the two groups in the sidebar.
    page.set_viewport_size({"width": 1400, "height": 900})
    _open(page, f"{web.url}/asset-groups", group_name(SWEEP))
    for sweep in (SWEEP, OTHER):
        assert page.get_by_text(group_name(sweep), exact=True).count() >= 2, sweep  # sidebar + graph
    page.screenshot(path=shots / "1-two-asset-groups.png")

    # Each group's own page: its four assets, linked under its own key prefix only.
    page.set_viewport_size({"width": 1800, "height": 1000})  # wide enough for the nodes' detail rows
    for sweep, partitions in ((SWEEP, len(TRIALS)), (OTHER, 2)):
        _open(page, f"{web.url}/locations/{location}/asset-groups/{group_name(sweep)}", "sweep_report")
        for name in ASSET_NAMES:
            assert page.get_by_text(name, exact=True).first.is_visible(), (sweep, name)
        wait_for(lambda: {s for s, _ in _asset_links(page)} == {sweep}, 15, interval=0.25,
                 what=lambda: f"links to {sweep}'s assets only on its group page: {_asset_links(page)}")
        assert page.get_by_text(f"{partitions} partitions", exact=True).first.is_visible(), sweep
        page.screenshot(path=shots / f"2-lineage-{group_name(sweep)}.png")


def test_browser_report_renders(ui, browser_page):
    page, web, shots = browser_page, ui["web"], ui["shots"]

    page.set_viewport_size({"width": 1400, "height": 2000})
    _open(page, f"{web.url}/assets/{SWEEP}/sweep_report", "best_score")
    for label in ("best_score", "best_params", "top_10", "plots", "completed_trials"):
        assert page.get_by_text(label, exact=True).first.is_visible(), label
    assert page.get_by_text("trial-003").first.is_visible()  # the top-10 table renders inline
    # the sweep's own job, sensor and upstream assets
    for text in (f"{group_name(SWEEP)}_sweep", f"{group_name(SWEEP)}_new_images", f"{SWEEP} / experiment_results",
                 f"{SWEEP} / run_settings"):
        assert page.get_by_text(text, exact=True).first.is_visible(), text
    page.screenshot(path=shots / "3-sweep-report.png")

    page.set_viewport_size({"width": 1400, "height": 1400})
    page.get_by_text("[Show Markdown]").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("score vs params").wait_for()
    sizes = wait_for(lambda: (lambda s: s if len(s) >= 3 and all(w > 0 for w, _ in s) else None)(
        page.evaluate("Array.from(document.querySelectorAll('[role=dialog] img')).map(i => [i.naturalWidth, i.naturalHeight])")),
        timeout=15, interval=0.25, what="the embedded plots to decode")
    assert all(w > 200 and h > 200 for w, h in sizes), sizes
    _settled(page)  # the dialog has faded in
    page.screenshot(path=shots / "4-sweep-report-plots.png")
    page.keyboard.press("Escape")

    page.set_viewport_size({"width": 1400, "height": 900})
    _open(page, f"{web.url}/assets/{SWEEP}/experiment_results?view=partitions", "trial-003")
    page.get_by_text("trial-002", exact=True).first.click()
    page.get_by_text("score", exact=True).first.wait_for()
    page.screenshot(path=shots / "5-experiment-results-partitions.png")


def test_materialize_from_the_ui_report_and_one_trial(ui, browser_page):
    page, web, shots = browser_page, ui["web"], ui["shots"]
    before = {r["runId"] for r in runs(web)}

    # sweep_report: the asset page's Materialize button launches a run straight away
    _open(page, f"{web.url}/assets/{SWEEP}/sweep_report", "best_score")
    _button(page, "Materialize").click()
    page.get_by_text("Launched run").first.wait_for()

    # one trial: Materialize… opens the launch dialog with the partition picker
    _open(page, f"{web.url}/assets/{SWEEP}/experiment_results", "Partitions")
    _button(page, "Materialize…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Launch runs to materialize {SWEEP} / experiment_results").wait_for()
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem", name="trial-002").click()
    page.keyboard.press("Escape")  # close the picker, keep the dialog
    page.get_by_placeholder("Filter partitions").wait_for(state="hidden")
    dialog.get_by_text("1 partition", exact=True).wait_for()
    _settled(page)
    page.screenshot(path=shots / "6-launch-one-trial.png")
    _button(dialog, "Launch 1 run").click()
    page.get_by_text("Launched run").first.wait_for()

    launched = wait_for(lambda: (lambda rs: rs if len(rs) >= 2 else None)(
        [r for r in runs(web) if r["runId"] not in before]), timeout=30, interval=0.5, what="two UI runs")
    assert all({"key": "dagster/from_ui", "value": "true"} in r["tags"] for r in launched)
    finished = {r["runId"]: wait_for_run(web, r["runId"], timeout=180) for r in launched}
    assert all(r["status"] == "SUCCESS" for r in finished.values()), (finished, ui["daemon"].tail())
    selections = sorted(tuple(sorted("/".join(p["path"]) for p in r["assetSelection"])) for r in finished.values())
    assert selections == [(f"{SWEEP}/experiment_results",), (f"{SWEEP}/sweep_report",)]
    trial_run = next(r for r in finished.values() if r["assetSelection"][0]["path"] == [SWEEP, "experiment_results"])
    assert {"key": "dagster/partition", "value": "trial-002"} in trial_run["tags"]
    for r in finished.values():
        print(f"UI run {r['runId'][:8]} {'/'.join(r['assetSelection'][0]['path'])}: "
              f"{r['endTime'] - r['startTime']:.1f}s")

    _open(page, f"{web.url}/assets/{SWEEP}/sweep_report", "best_score")
    _button(page, "Plots").click()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots / "7-sweep-report-history.png")
