"""A real Ray cluster on loopback for tests: one head and ``nodes - 1`` worker nodes, each a
``ray start --block`` :class:`Service` (its own session), on its own loopback address (127.0.0.2,
127.0.0.3, ...). Token authentication is on, with a token made for this cluster only
(``RAY_AUTH_TOKEN``; ``~/.ray/auth_token`` is neither read nor written).

``stop()`` ends only what ``start_ray_cluster`` started: each node's service (process group, session
and descendants), workers first. It never runs ``ray stop`` (that would end every Ray process on the
machine, including other tests' and users').

    cluster = start_ray_cluster(tmp_path, nodes=2, num_cpus=1)
    env = {**os.environ, **cluster.env, "IMGTUNE_RAY_ADDRESS": cluster.address}
    ...
    cluster.stop()
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgtune_assets_tests.support.processes import Service, free_port
from imgtune_assets_tests.support.sweeps import PROJECT

HEAD_IP = "127.0.0.2"
RAY_BIN = Path(sys.executable).with_name("ray")

# Variables that must not leak from the test process into the nodes: the loopback switch forbids a
# second node, and an ambient address or token would point the nodes somewhere else.
_SCRUBBED = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "RAY_AUTH_MODE", "IMGTUNE_RAY_ADDRESS")


@dataclass
class RayCluster:
    address: str  # "127.0.0.2:PORT", what a client passes to ray.init(address=...)
    env: dict[str, str]  # what a client's environment needs: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN
    node_ips: list[str]
    temp_dir: Path = field(default=None, repr=False)  # Ray's own (short) temp dir; removed by stop()
    log_dir: Path = field(default=None, repr=False)  # stdout/stderr of each `ray start`
    nodes: list[Service] = field(default_factory=list, repr=False)  # head first

    def pids(self) -> set[int]:
        """Every live process of this cluster: the `ray start` leaders, their sessions, descendants."""
        return {proc.pid for node in self.nodes for proc in node.processes()}

    def logs(self) -> str:
        return "\n".join(f"--- node {i} ({node.log}):\n{node.tail(3000)}" for i, node in enumerate(self.nodes))

    def stop(self, grace: float = 20.0) -> None:
        """Each node's service, workers first while the head's GCS is still there to hear of it."""
        for node in reversed(self.nodes):
            node.stop(grace)
        self.nodes.clear()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _node_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
                # A test cluster runs nothing worth draining: stop at once on SIGTERM (default: drain 30 s).
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    return env


# Run by a client process (a Ray driver must not live in the test process): wait until `want` nodes
# are alive, print their addresses.
_WAIT_SCRIPT = textwrap.dedent("""
    import sys, ray
    from imgtune_assets_tests.support.waiting import wait_for
    address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    alive = lambda: sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    try:
        wait_for(lambda: len(alive()) >= want, timeout, interval=0.2, what=f"{want} alive Ray nodes")
    finally:
        print(",".join(alive()))
        ray.shutdown()
""")


def start_ray_cluster(tmp_dir: Path, nodes: int = 2, num_cpus: int = 1, timeout: float = 90.0) -> RayCluster:
    """Start a head on 127.0.0.2 and ``nodes - 1`` workers on 127.0.0.3...; return once all are alive.

    ``tmp_dir`` receives each node's `ray start` output; Ray's own temp dir is a short /tmp/rc-XXXX
    folder (unix socket paths are limited to ~107 characters), removed by ``stop()``.
    """
    if nodes < 1:
        raise ValueError("nodes must be >= 1")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    env = _node_env(token)
    port = free_port(HEAD_IP)
    ray_temp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    ips = [f"127.0.0.{2 + i}" for i in range(nodes)]
    cluster = RayCluster(address=f"{HEAD_IP}:{port}", env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                         node_ips=ips, temp_dir=ray_temp, log_dir=tmp_dir)
    common = ["--block", "--disable-usage-stats", f"--num-cpus={num_cpus}", "--num-gpus=0"]
    try:
        cluster.nodes.append(Service("ray-head", [
            str(RAY_BIN), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
            "--include-dashboard=false", f"--temp-dir={ray_temp / 'n0'}", *common], env, tmp_dir / "ray-node-0.log"))
        for i, ip in enumerate(ips[1:], start=1):
            cluster.nodes.append(Service(f"ray-node-{i}", [
                str(RAY_BIN), "start", f"--address={cluster.address}", f"--node-ip-address={ip}",
                f"--temp-dir={ray_temp / f'n{i}'}", *common], env, tmp_dir / f"ray-node-{i}.log"))
        result = subprocess.run([sys.executable, "-c", _WAIT_SCRIPT, cluster.address, str(nodes), str(timeout)],
                                cwd=PROJECT, env={**env, **cluster.env}, capture_output=True, text=True,
                                timeout=timeout + 60)
        if result.returncode != 0:
            raise RuntimeError(f"Ray cluster at {cluster.address} did not reach {nodes} alive node(s): "
                               f"{result.stdout.strip()} {result.stderr[-2000:]}\n{cluster.logs()}")
        for i, node in enumerate(cluster.nodes):
            if not node.alive():
                raise RuntimeError(f"`ray start` for node {i} exited ({node.proc.returncode}):\n{node.tail()}")
        alive = set(result.stdout.strip().split(","))
        if not set(ips) <= alive:
            raise RuntimeError(f"expected nodes {ips}, alive: {sorted(alive)}")
        return cluster
    except BaseException:
        cluster.stop()
        raise


if __name__ == "__main__":  # manual check: python -m imgtune_assets_tests.support.raycluster
    start = time.monotonic()
    with start_ray_cluster(Path(tempfile.mkdtemp(prefix="rclog-")), nodes=2) as c:
        print(f"cluster {c.address} nodes {c.node_ips} up in {time.monotonic() - start:.1f}s; "
              f"{len(c.pids())} processes")
    print("stopped")
