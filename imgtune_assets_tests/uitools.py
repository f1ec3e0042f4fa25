"""Helpers for tests that run the real Dagster services: ``dagster-daemon run`` and
``dagster-webserver`` on a temporary DAGSTER_HOME, the ``dagster`` CLI, and GraphQL over loopback.

Every process is started in its own session (process group) and stopped by that group id, so a
test ends exactly what it started (the run workers and the embedded Ray the runs start included)
and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgtune_assets_tests.conftest import PROJECT, VENV_BIN

MODULE = "imgtune_assets.definitions"
# No -m/-w: run from the project folder, every tool finds the code through pyproject's [tool.dagster]
# (code location "imgtune"), exactly as the README's commands do. Schedule/sensor state is keyed by the
# code location, so `dagster schedule start`, the daemon and the webserver must all name it the same way.
CODE: list[str] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 1.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def dagster_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``dagster ARGS`` from the project folder; raise with its output on failure."""
    result = subprocess.run([str(VENV_BIN / "dagster"), *args], cwd=PROJECT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"dagster {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


class Service:
    """A long-running process in its own process group, its output in ``log``."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self._log_handle = open(log, "wb")
        self.proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=self._log_handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the group (lets the daemon and run workers shut down), then SIGKILL."""
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; give the rest of the group (run workers, Ray) a moment, then end it.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self._log_handle.close()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all(*services: "Service | Webserver") -> None:
    """Stop several services at once: SIGTERM to every group first, then wait for each."""
    for service in services:
        service = getattr(service, "service", service)
        try:
            os.killpg(service.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for service in services:
        service.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def start_daemon(env: dict[str, str], log: Path) -> Service:
    return Service("dagster-daemon", [str(VENV_BIN / "dagster-daemon"), "run", *CODE], env, log)


def start_webserver(env: dict[str, str], log: Path, port: int | None = None, timeout: float = 90) -> "Webserver":
    port = port or free_port()
    service = Service("dagster-webserver", [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                            *CODE], env, log)
    web = Webserver(service, f"http://127.0.0.1:{port}")
    try:
        wait_for(web.ready, timeout, interval=0.5, what="the webserver to answer")
    except TimeoutError:
        service.stop()
        raise TimeoutError(f"webserver did not start:\n{service.tail()}") from None
    return web


class Webserver:
    def __init__(self, service: Service, url: str):
        self.service, self.url = service, url

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


FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def wait_for_run(web: Webserver, run_id: str, timeout: float = 180) -> dict:
    def done():
        found = runs(web, runIds=[run_id])
        return found[0] if found and found[0]["status"] in FINISHED else None
    return wait_for(done, timeout, interval=1.0, what=f"run {run_id} to finish")
