"""A real, throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a fresh temp dir, listening
on 127.0.0.1 only (a free port) and on a unix socket inside that dir, password authentication (a
random password made for this server), one database for Dagster.

    server = start_postgres()           # raises PostgresMissing when initdb/pg_ctl are not installed
    env = {**os.environ, **server.env}  # DAGSTER_PG_HOST, _PORT, _USER, _PASSWORD, _DB
    ...
    server.stop()

PostgreSQL refuses to run as root: when this process is root, the cluster is created and run as the
``postgres`` system user (Debian's package creates it) by passing ``user=``/``group=`` to
``subprocess`` (what ``runuser -u postgres --`` does). The data dir lives in its own ``/tmp/pg-*``
folder (pytest's ``/tmp/pytest-of-root`` is mode 0700, which that user cannot enter).

``stop()`` ends only this server: ``pg_ctl stop`` on its own data dir, then, if the postmaster is still
there, that pid (read from its ``postmaster.pid``), and removes the temp dir. It never touches any
other PostgreSQL on the machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"
PG_TOOLS = ("initdb", "pg_ctl", "createdb")
MISSING_HELP = (
    "PostgreSQL is missing: imgtune's Postgres tests start a real PostgreSQL server and need its "
    "server programs (initdb, pg_ctl), looked for under /usr/lib/postgresql/*/bin and on PATH. "
    "Install Debian's package: `apt-get update && apt-get install -y postgresql` (.ci/run does this)."
)
# Test-only speed settings: nothing here must survive a crash.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"}


class PostgresMissing(RuntimeError):
    pass


def _version_key(path: str) -> tuple:
    match = re.search(r"/postgresql/([0-9.]+)/bin", path)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl, else the folder of
    ``initdb`` on PATH; raises :class:`PostgresMissing` (with install instructions) if there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in PG_TOOLS):
            return Path(folder)
    raise PostgresMissing(MISSING_HELP)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str
    db_name: str
    bin_dir: Path
    base_dir: Path  # /tmp/pg-XXXX: data/, the socket, server.log; removed by stop()
    run_as: str | None = None  # the system user the server runs as (None: this process's user)
    _stopped: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def env(self) -> dict[str, str]:
        """What deploy/postgres/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.db_name,
        }

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.db_name}"

    def pid(self) -> int | None:
        """The postmaster's pid, from this server's own ``postmaster.pid``."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self._stopped:
            return
        self._stopped = True
        pid = self.pid()
        if pid is not None:
            _run_pg([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                     "-t", str(int(timeout)), "stop"], self.run_as, self.base_dir, check=False, timeout=timeout + 10)
            if _is_our_postmaster(pid, self.data_dir):
                os.kill(pid, signal.SIGKILL)  # by pid, and only after checking it is this server's postmaster
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _is_our_postmaster(pid, self.data_dir):
                    time.sleep(0.1)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "State:\tZ" in status:
        return False
    return any(part.decode(errors="replace") == str(data_dir) for part in cmdline)


def _run_pg(command: list[str], run_as: str | None, cwd: Path, *, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    kwargs = {}
    if run_as:
        account = pwd.getpwnam(run_as)
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env = {**(env or os.environ), "HOME": str(cwd), "USER": run_as, "LOGNAME": run_as}
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    return result


def _server_account() -> str | None:
    """None when not root; else a system user PostgreSQL will run as (Debian's ``postgres``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresMissing("running as root and there is no 'postgres' user to run PostgreSQL as "
                          "(initdb refuses root); " + MISSING_HELP)


def start_postgres(db_name: str = "dagster", user: str = "dagster", timeout: float = 60,
                   settings: dict[str, str] | None = None) -> PgServer:
    """Create and start a PostgreSQL server on 127.0.0.1 and a database ``db_name`` owned by ``user``."""
    bin_dir = find_pg_bin()
    run_as = _server_account()
    base = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    password = secrets.token_hex(16)
    server = PgServer(HOST, 0, user, password, db_name, bin_dir, base, run_as)
    try:
        if run_as:
            account = pwd.getpwnam(run_as)
            os.chown(base, account.pw_uid, account.pw_gid)
        os.chmod(base, 0o700)
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        if run_as:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        os.chmod(pwfile, 0o600)
        _run_pg([str(bin_dir / "initdb"), "-D", str(server.data_dir), f"--username={user}", f"--pwfile={pwfile}",
                 "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
                run_as, base, timeout=timeout)
        pwfile.unlink()
        options = {"listen_addresses": HOST, "unix_socket_directories": str(base), **FAST_SETTINGS,
                   **(settings or {})}
        for attempt in range(3):  # the free port may be taken between choosing and binding it
            server.port = _free_port()
            opts = " ".join(f"-c {k}={v}" for k, v in {**options, "port": str(server.port)}.items())
            started = _run_pg([str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-l", str(server.log_file),
                               "-o", opts, "-w", "-t", str(int(timeout)), "start"],
                              run_as, base, check=False, timeout=timeout + 10)
            if started.returncode == 0:
                break
            if attempt == 2 or "already in use" not in server.tail():
                raise RuntimeError(f"pg_ctl start failed ({started.returncode}):\n{started.stdout}\n"
                                   f"{started.stderr}\n{server.tail()}")
        client_env = {**os.environ, "PGPASSWORD": password}
        _run_pg([str(bin_dir / "createdb"), "-h", HOST, "-p", str(server.port), "-U", user, db_name],
                None, base, env=client_env, timeout=timeout)
        return server
    except BaseException:
        server.stop()
        raise


if __name__ == "__main__":  # manual check: python -m imgtune_assets_tests.pgserver
    began = time.monotonic()
    with start_postgres() as pg:
        print(f"PostgreSQL up in {time.monotonic() - began:.1f}s: {pg.host}:{pg.port} db {pg.db_name} "
              f"(pid {pg.pid()}, as {pg.run_as or 'me'})")
    print("stopped")
