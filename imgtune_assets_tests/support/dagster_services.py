"""The real Dagster programs for tests: the ``dagster`` CLI, ``dagster-daemon run`` and
``dagster-webserver`` on loopback (each a :class:`Service`), GraphQL over HTTP, and reading runs and
materializations back from an instance.

No ``-m``/``-w`` (``CODE`` is empty): run from the project folder, every tool finds the code through
pyproject's ``[tool.dagster]`` (code location ``imgtune``), as the README's commands do. Schedule and
sensor state is keyed by the code location, so ``dagster schedule start``, the daemon and the
webserver must all name it the same way.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dagster import AssetKey, DagsterInstance, DagsterRunStatus

from imgtune_assets_tests.support.processes import LOOPBACK, Service, free_port
from imgtune_assets_tests.support.sweeps import PROJECT, VENV_BIN
from imgtune_assets_tests.support.waiting import wait_for

CODE: list[str] = []
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
FINISHED_STATUSES = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def dagster_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``dagster ARGS`` from the project folder; raise with its output on failure."""
    return run_checked([str(VENV_BIN / "dagster"), *args], env, timeout=timeout)


def run_checked(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command from the project folder to its end; AssertionError with its output on failure."""
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        shown = " ".join(command[1:]) if command and command[0].endswith("dagster") else " ".join(command)
        raise AssertionError(f"{shown} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def start_daemon(env: dict[str, str], log: Path) -> Service:
    return Service("dagster-daemon", [str(VENV_BIN / "dagster-daemon"), "run", *CODE], env, log)


def start_webserver(env: dict[str, str], log: Path, port: int | None = None, timeout: float = 90) -> "Webserver":
    """``dagster-webserver -h 127.0.0.1 -p PORT``; returns once it answers (its code location may still be
    loading: see :meth:`Webserver.wait_for_location`)."""
    port = port or free_port()
    service = Service("dagster-webserver", [str(VENV_BIN / "dagster-webserver"), "-h", LOOPBACK, "-p", str(port),
                                            *CODE], env, log)
    web = Webserver(service, f"http://{LOOPBACK}:{port}")
    try:
        wait_for(web.ready, timeout, interval=0.25, what=lambda: f"the webserver to answer\n{service.tail()}")
    except BaseException:
        service.stop()
        raise
    return web


LOCATIONS = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message causes { message } } ... on RepositoryLocation { name } }
} } } }"""

RELOAD = """
mutation Reload($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) {
    __typename
    ... on WorkspaceLocationEntry { name loadStatus
      locationOrLoadError { __typename ... on PythonError { message causes { message } }
                            ... on RepositoryLocation { name } } }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on ReloadNotSupported { message }
    ... on RepositoryLocationNotFound { message }
  }
}"""


class Webserver:
    def __init__(self, service: Service, url: str):
        self.service, self.url = service, url

    @property
    def pid(self) -> int:
        return self.service.pid

    def ready(self) -> bool:
        if not self.service.alive():
            raise RuntimeError(f"webserver exited:\n{self.service.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def locations(self) -> list[dict]:
        """The workspace's code locations: ``name``, ``loadStatus`` and ``locationOrLoadError``."""
        data = self.graphql(LOCATIONS)["workspaceOrError"]
        assert data["__typename"] == "Workspace", data
        return data["locationEntries"]

    def wait_for_location(self, timeout: float = 90) -> dict:
        """The one code location, once loaded (successfully or with a load error)."""
        def loaded():
            entries = self.locations()
            return entries[0] if len(entries) == 1 and entries[0]["loadStatus"] == "LOADED" else None
        return wait_for(loaded, timeout, interval=0.25, what=lambda: f"the code location to load\n{self.tail()}")

    def reload_location(self, name: str) -> dict:
        """``reloadRepositoryLocation``: the location's entry after the reload (or the error)."""
        return self.graphql(RELOAD, {"name": name}, timeout=120)["reloadRepositoryLocation"]

    def tail(self, chars: int = 4000) -> str:
        return self.service.tail(chars)

    def stop(self) -> None:
        self.service.stop()


RUNS_QUERY = """
query Runs($filter: RunsFilter, $limit: Int) {
  runsOrError(filter: $filter, limit: $limit) {
    __typename
    ... on Runs { results { runId jobName status tags { key value } assetSelection { path } startTime endTime } }
  }
}
"""


def runs(web: Webserver, **filters: Any) -> list[dict]:
    data = web.graphql(RUNS_QUERY, {"filter": filters, "limit": 50})["runsOrError"]
    assert data["__typename"] == "Runs", data
    return data["results"]


def wait_for_run(web: Webserver, run_id: str, timeout: float = 180) -> dict:
    def done():
        found = runs(web, runIds=[run_id])
        return found[0] if found and found[0]["status"] in FINISHED else None
    return wait_for(done, timeout, interval=0.5, what=f"run {run_id} to finish")


def run_failures(instance: DagsterInstance, records, *, events=("STEP_FAILURE", "RUN_FAILURE")) -> str:
    """The failure messages (and errors) of the runs among ``records`` that did not succeed, for
    assertion messages."""
    out = []
    for record in records:
        if record.dagster_run.status == DagsterRunStatus.SUCCESS:
            continue
        for event in instance.all_logs(record.dagster_run.run_id):
            if event.is_dagster_event and event.dagster_event.event_type_value in events:
                error = getattr(event.dagster_event.event_specific_data, "error", "") or ""
                out.append(f"{record.dagster_run.run_id[:8]}: {event.dagster_event.message}\n{error}")
    return "\n".join(out)[-8000:]


def materializations_by_partition(instance: DagsterInstance, key: AssetKey, limit: int = 1000) -> dict[str, list]:
    """``{partition: [materialization records, newest first]}`` of an asset."""
    by_partition: dict[str, list] = {}
    for record in instance.fetch_materializations(key, limit=limit).records:
        by_partition.setdefault(record.asset_materialization.partition, []).append(record)
    return by_partition
