"""The embedded Ray's plain logic, without starting Ray: its environment switches, the address a
sweep command hands its runs, the notices it drops, and the lean start's wait for the node's
registration. Starting and stopping a real embedded Ray (through ``RayResource``, as runs do) is tested
in defs/test_resources.py."""

import logging
import os
import threading

import pytest

from imgtune_assets.core import embedded_ray


def test_prepare_environment_sets_loopback_and_priority_but_leaves_what_the_user_set(monkeypatch):
    for key in embedded_ray.EMBEDDED_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_worker_niceness", "5")  # the user's own choice wins
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # ...but never opens the embedded Ray
    embedded_ray.prepare_environment(lean=False)
    assert all(os.environ[k] == v for k, v in embedded_ray.LOOPBACK_ENV.items())
    assert os.environ["RAY_worker_niceness"] == "5"
    assert not any(k in os.environ for k in embedded_ray.LEAN_TUNING_ENV)  # Ray as shipped
    embedded_ray.prepare_environment(lean=True)
    assert all(os.environ[k] == v for k, v in embedded_ray.LEAN_TUNING_ENV.items())


def test_an_inherited_auth_mode_never_turns_the_embedded_rays_tokens_off():
    """(In a fresh interpreter: Ray reads the mode when first imported, and this one has imported it.)"""
    import subprocess
    import sys

    script = ("import os, sys; from imgtune_assets.core import embedded_ray; "
              "assert 'ray' not in sys.modules; embedded_ray.prepare_environment(); print(os.environ['RAY_AUTH_MODE'])")
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "token"


def test_an_embedded_ray_off_loopback_is_stopped_with_the_reason(monkeypatch):
    embedded_ray._check_loopback("127.0.0.1:6379")  # on loopback: nothing to do
    stopped = []
    import ray

    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))  # no Ray is started here
    with pytest.raises(RuntimeError, match=r"started on 10\.1\.2\.3:6379, not on 127\.0\.0\.1, and was stopped: "
                                           r"Ray was imported .* RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"):
        embedded_ray._check_loopback("10.1.2.3:6379")
    assert stopped == [True]


def test_the_lean_switch_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(embedded_ray.LEAN_ENV, raising=False)
    assert embedded_ray.lean_from_environment()
    for value in ("0", "false", "No", " off "):
        monkeypatch.setenv(embedded_ray.LEAN_ENV, value)
        assert not embedded_ray.lean_from_environment()
    for value in ("1", "true", "yes", "", "anything"):
        monkeypatch.setenv(embedded_ray.LEAN_ENV, value)
        assert embedded_ray.lean_from_environment()


def test_a_dropped_notice_is_dropped_only_meanwhile_and_only_that_one(caplog):
    logger = logging.getLogger("imgtune-test.dropped")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with embedded_ray._dropped(logger.name, "Token authentication is enabled"):
            logger.info("Token authentication is enabled for this Ray cluster.")
            logger.info("Something else about tokens")
        logger.info("Token authentication is enabled (after)")
    assert [r.getMessage() for r in caplog.records] == ["Something else about tokens",
                                                        "Token authentication is enabled (after)"]
    assert logger.filters == []


def test_the_hosted_address_file_names_itself_when_it_is_not_json(tmp_path):
    file = tmp_path / embedded_ray.HOSTED_RAY_FILE_NAME
    file.write_text("{not json")
    with pytest.raises(RuntimeError, match=f"{file}: unreadable address of the imgtune command's embedded Ray"):
        embedded_ray.hosted_address(file, timeout=1)


def test_hosted_address_waits_for_the_commands_file_and_names_it_when_it_cannot_be_used(tmp_path):
    file = tmp_path / embedded_ray.HOSTED_RAY_FILE_NAME
    writer = threading.Timer(0.2, lambda: file.write_text('{"address": "127.0.0.1:6380"}'))
    writer.start()
    try:
        assert embedded_ray.hosted_address(file, timeout=30) == "127.0.0.1:6380"
    finally:
        writer.cancel()
    file.write_text('{"error": "ValueError: num_cpus must be nonnegative"}')
    with pytest.raises(RuntimeError, match=f"failed to start: ValueError: num_cpus must be nonnegative.*{file}"):
        embedded_ray.hosted_address(file)
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'none.json'}: .* not up after 0 s"):
        embedded_ray.hosted_address(tmp_path / "none.json", timeout=0.1)




class _NodeTable:
    """GCS's node table as the lean start's poll sees it: the node registers on the ``registers_at``-th look."""

    def __init__(self, node_id: str, registers_at: int, fails: bool = False):
        self.node_id, self.registers_at, self.fails, self.looks = node_id, registers_at, fails, 0

    def client(self, address: str):
        assert address == "127.0.0.1:6379"
        return self

    def get_all_node_info(self, timeout=None):
        self.looks += 1
        if self.fails:
            raise ConnectionError("GCS not reachable")
        key = type("NodeID", (), {"hex": lambda _self: self.node_id})()
        return {key: "record"} if self.looks >= self.registers_at else {}


@pytest.mark.parametrize("registers_at, fails", [(4, False), (1, False), (1, True)])
def test_the_lean_start_looks_the_node_up_once_it_has_registered(monkeypatch, registers_at, fails):
    """Ray's lookup of the new node (which retries once a second) runs only once the poll sees the node
    in GCS's table; if polling fails, Ray's lookup waits as shipped."""
    monkeypatch.setattr(embedded_ray, "REGISTRATION_POLL_SECONDS", 0.001)
    table = _NodeTable("ab12", registers_at, fails)
    lookups = []

    def ray_lookup(gcs_address, node_id):
        lookups.append((gcs_address, node_id, table.looks))
        return {"node_id": node_id}

    lookup = embedded_ray._after_registration(ray_lookup, table.client)
    assert lookup("127.0.0.1:6379", "ab12") == {"node_id": "ab12"}
    assert lookups == [("127.0.0.1:6379", "ab12", 1 if fails else registers_at)]


