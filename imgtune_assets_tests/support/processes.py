"""Processes the tests start, and only those: each in its own session and process group, stopped by
signalling that group; anything that left the group (a process that started a session of its own,
or a descendant orphaned by a killed parent) is ended by pid, and only if it was seen as ours
(same session, or a descendant of one of ours) — never by name.

    with Service("webserver", [...], env, tmp / "webserver.log") as web:
        wait_for(..., 60, what=lambda: web.tail())
    # stopped: SIGTERM to the group, a grace period, then SIGKILL to whatever is left
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import psutil

from imgtune_assets_tests.support.sweeps import PROJECT
from imgtune_assets_tests.support.waiting import wait_for

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the caller binds it soon; a race is possible, rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail_text(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a (log) file; empty if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - chars * 4))
            return handle.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


def ended_after(proc: subprocess.Popen, ready, act, timeout: float = 150) -> tuple[str, str, float]:
    """Wait for ``ready()`` while ``proc`` runs, do ``act()`` to it (stop its cluster, signal it), and
    collect its output: (stdout, stderr, seconds from ``act`` to its end). ``proc`` is killed if anything
    fails on the way."""
    import time

    try:
        ready()
        act()
        acted = time.monotonic()
        stdout, stderr = proc.communicate(timeout=timeout)
        return stdout, stderr, time.monotonic() - acted
    finally:
        proc.kill()
        proc.wait()


def gone(proc: psutil.Process) -> bool:
    """Exited (a zombie awaiting its parent counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Service:
    """A command in a session of its own (``setsid``: its group id is its pid), output to ``log``."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None, log: Path | None = None,
                 cwd: Path | str = PROJECT, **popen):
        self.name, self.command, self.log = name, list(command), log
        handle = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, **popen)
        finally:
            if log is not None:
                handle.close()  # the child has its own copy
        self._seen: dict[int, psutil.Process] = {}
        self._stopped = False
        self.processes()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return tail_text(self.log, chars) if self.log is not None else ""

    def processes(self) -> list[psutil.Process]:
        """Every live process of this service: the leader, its descendants, the members of its session,
        and any process seen here before (orphans of a killed leader) that still runs."""
        found: dict[int, psutil.Process] = {}
        try:
            leader = psutil.Process(self.pid)
            if not gone(leader):
                found[leader.pid] = leader
        except psutil.NoSuchProcess:
            pass
        for proc in list(found.values()) + list(self._seen.values()):
            try:
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.pid:
                    found.setdefault(proc.pid, proc)
            except OSError:
                continue
        for pid, proc in self._seen.items():
            found.setdefault(pid, proc)
        live = {pid: proc for pid, proc in found.items() if not gone(proc)}
        self._seen.update(live)
        return list(live.values())

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_leader(self, timeout: float = 30) -> list[psutil.Process]:
        """SIGKILL the leader alone (as a user or the OOM killer would), leaving what it started; those
        are remembered and ended by ``stop()``. Returns them."""
        others = [p for p in self.processes() if p.pid != self.pid]
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=timeout)
        return others

    def stop(self, grace: float = 20, sig: int = signal.SIGTERM) -> None:
        """``sig`` to the group (a clean shutdown: the daemon ends its runs, Ray its workers), up to
        ``grace`` seconds for every process of the service to exit, then SIGKILL to the rest."""
        if self._stopped:
            return
        self._stopped = True
        known = self.processes()
        self.signal_group(sig)
        for proc in known:
            if proc.pid != self.pid:
                try:
                    if os.getpgid(proc.pid) != self.pid:
                        proc.send_signal(sig)  # left the group: by pid, known to be ours
                except (psutil.NoSuchProcess, ProcessLookupError):
                    pass
        self._wait_gone(grace)
        leftovers = self.processes()
        if leftovers:
            self.signal_group(signal.SIGKILL)
            for proc in leftovers:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            self._wait_gone(10)

    def _wait_gone(self, timeout: float) -> None:
        def all_gone() -> bool:
            self.proc.poll()  # reap the leader (our child)
            return all(gone(p) for p in self._seen.values())
        try:
            wait_for(all_gone, timeout, interval=0.05, what=f"{self.name} to exit")
        except TimeoutError:
            pass

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all(*services, grace: float = 20) -> None:
    """Stop several services together: every group is signalled first, then each is waited for."""
    services = [getattr(s, "service", s) for s in services]
    for service in services:
        if not service._stopped:
            service.processes()
            service.signal_group(signal.SIGTERM)
    for service in services:
        service.stop(grace)
