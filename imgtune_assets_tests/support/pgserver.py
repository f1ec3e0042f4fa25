"""A real, throwaway PostgreSQL server for tests: ``initdb`` in a fresh temp dir, then the ``postgres``
server itself as a :class:`Service` (its own session), listening on 127.0.0.1 only (a free port) and on
a unix socket inside that dir, password authentication (a random password made for this server), one
database for Dagster.

    server = start_postgres()           # raises PostgresMissing when initdb/postgres are not installed
    env = {**os.environ, **server.env}  # DAGSTER_PG_HOST, _PORT, _USER, _PASSWORD, _DB
    ...
    server.stop()

PostgreSQL refuses to run as root: when this process is root, the cluster is created and run as the
``postgres`` system user (Debian's package creates it) by passing ``user=``/``group=`` to
``subprocess`` (what ``runuser -u postgres --`` does). The data dir lives in its own ``/tmp/pg-*``
folder (pytest's ``/tmp/pytest-of-root`` is mode 0700, which that user cannot enter).

``stop()`` ends only this server: SIGINT (PostgreSQL's fast shutdown) to its process group, SIGKILL
after a grace period, then removes the temp dir. It never touches any other PostgreSQL on the machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from imgtune_assets_tests.support.processes import LOOPBACK, Service, free_port
from imgtune_assets_tests.support.waiting import wait_for

HOST = LOOPBACK
PG_TOOLS = ("initdb", "postgres")
MISSING_HELP = (
    "PostgreSQL is missing: imgtune's Postgres tests start a real PostgreSQL server and need its "
    "server programs (initdb, postgres), looked for under /usr/lib/postgresql/*/bin and on PATH. "
    "Install Debian's package: `apt-get update && apt-get install -y postgresql` (`make system-deps` does)."
)
# Test-only speed settings: nothing here must survive a crash.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"}


class PostgresMissing(RuntimeError):
    pass


def _version_key(path: str) -> tuple:
    match = re.search(r"/postgresql/([0-9.]+)/bin", path)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and postgres, else the folder of
    ``initdb`` on PATH; raises :class:`PostgresMissing` (with install instructions) if there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in PG_TOOLS):
            return Path(folder)
    raise PostgresMissing(MISSING_HELP)


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
    service: Service | None = field(default=None, repr=False)
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
        """The postmaster's pid (the service's leader), while it runs."""
        return self.service.pid if self.service is not None and self.service.alive() else None

    def tail(self, chars: int = 3000) -> str:
        return self.service.tail(chars) if self.service is not None else ""

    def connect(self, dbname: str | None = None, timeout: int = 5):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname or self.db_name, connect_timeout=timeout)

    def stop(self, grace: float = 30) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.service is not None:
            self.service.stop(grace, sig=signal.SIGINT)  # SIGINT: fast shutdown (SIGTERM would wait for clients)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _as_user(run_as: str | None, cwd: Path, env: dict[str, str] | None = None) -> dict:
    """``subprocess`` arguments that run a command as ``run_as`` (None: as this process's user)."""
    if not run_as:
        return {"env": env}
    account = pwd.getpwnam(run_as)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
            "env": {**(env or os.environ), "HOME": str(cwd), "USER": run_as, "LOGNAME": run_as}}


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


def _accepts_connections(server: PgServer) -> bool:
    if not server.service.alive():
        raise RuntimeError(f"postgres exited ({server.service.proc.returncode}):\n{server.tail()}")
    try:
        server.connect("postgres", timeout=2).close()
        return True
    except Exception:  # noqa: BLE001 - not accepting connections yet
        return False


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
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(server.data_dir), f"--username={user}", f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
            cwd=base, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            **_as_user(run_as, base))
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout[-2000:]}\n{initdb.stderr[-3000:]}")
        pwfile.unlink()
        options = {"listen_addresses": HOST, "unix_socket_directories": str(base), **FAST_SETTINGS,
                   **(settings or {})}
        for attempt in range(3):  # the free port may be taken between choosing and binding it
            server.port = free_port(HOST)
            opts = [arg for k, v in {**options, "port": str(server.port)}.items() for arg in ("-c", f"{k}={v}")]
            server.service = Service("postgres", [str(bin_dir / "postgres"), "-D", str(server.data_dir), *opts],
                                     log=server.log_file, cwd=base, **_as_user(run_as, base))
            try:
                wait_for(lambda: _accepts_connections(server), timeout, interval=0.1,
                         what=lambda: f"PostgreSQL on {HOST}:{server.port}\n{server.tail()}")
                break
            except RuntimeError:
                if attempt == 2 or "already in use" not in server.tail():
                    raise
                server.service.stop()
        conn = server.connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db_name}" OWNER "{user}"')
        finally:
            conn.close()
        return server
    except BaseException:
        server.stop()
        raise


if __name__ == "__main__":  # manual check: python -m imgtune_assets_tests.support.pgserver
    began = time.monotonic()
    with start_postgres() as pg:
        print(f"PostgreSQL up in {time.monotonic() - began:.1f}s: {pg.host}:{pg.port} db {pg.db_name} "
              f"(pid {pg.pid()}, as {pg.run_as or 'me'})")
    print("stopped")
