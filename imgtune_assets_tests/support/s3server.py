"""A throwaway S3 API for tests: moto's standalone server (``moto_server -H 127.0.0.1 -p PORT``, the
venv's executable) as a :class:`Service` in its own session, on loopback only, stopped by signalling
its process group. Nothing here ever talks to AWS: every client is given the server's endpoint.

    with MotoServer.start(tmp_path) as server:              # or enforce_auth_after=N
        make_bucket(server, "data")                         # boto3 create_bucket
        fs = server.filesystem()                            # s3fs against it (dummy credentials)
        upload_folder(fs, local_folder, "data/prefix")      # s3://data/prefix/<same tree>

Tests put :func:`s3_environment` into their environment (dummy credentials, region, a dead proxy for
anything that is not loopback) and drop :data:`SCRUBBED_ENV`.

``enforce_auth_after=N`` starts moto with ``INITIAL_NO_AUTH_ACTION_COUNT=N``: the first ``N`` API requests
are accepted with any credentials, later ones need an IAM access key moto knows of — create it with
:meth:`MotoServer.create_access_key` among the first requests. The readiness probe uses moto's own
``/moto-api/`` page, which is not counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from imgtune_assets_tests.support.processes import LOOPBACK, Service, free_port
from imgtune_assets_tests.support.waiting import wait_for

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
REGION = "us-east-1"
# Dummy credentials for the tests' environment: moto accepts any when it does not enforce IAM.
DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret-b7f3c1d9e2a84f65"
# A proxy address nothing listens on (port 9, discard, on loopback).
DEAD_PROXY = "http://127.0.0.1:9"

# Variables that would send an S3 client elsewhere than the endpoint it is given, or to a profile.
SCRUBBED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_IAM", "AWS_PROFILE",
             "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def s3_environment(key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> dict[str, str]:
    """What a test's (or a child process's) environment needs for S3 on the test server: credentials
    (dummy unless given), the region, no shared config files, IMDS off, and every request that is not
    for loopback sent to a dead proxy."""
    return {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        # Anything not on loopback goes to a proxy that is not there: a client that missed the endpoint
        # fails at once instead of reaching AWS.
        "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def scrubbed_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) without the variables that could point a client elsewhere."""
    return {k: v for k, v in (os.environ if base is None else base).items() if k not in SCRUBBED_ENV}


@dataclass
class AccessKey:
    user: str
    key_id: str
    secret: str


class MotoServer:
    """moto's S3 (and IAM) API on ``http://127.0.0.1:PORT``."""

    def __init__(self, service: Service, port: int):
        self.service, self.port = service, port
        self.endpoint_url = f"http://{LOOPBACK}:{port}"

    @classmethod
    def start(cls, log_dir: Path, *, enforce_auth_after: int | None = None, record: bool = False,
              timeout: float = 60) -> "MotoServer":
        """Start on a free loopback port; return once it answers (its process group stopped on failure).
        ``record``: moto's request recorder is available (``recorded``)."""
        if not MOTO_SERVER.exists():
            raise RuntimeError(f"{MOTO_SERVER} is missing: install moto's server (pip install 'moto[server]')")
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**scrubbed_environment(), **s3_environment()}
        if enforce_auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(int(enforce_auth_after))
        else:
            env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        if record:
            env.update(MOTO_ENABLE_RECORDING="True", MOTO_RECORDER_FILEPATH=str(log_dir / "moto-recording.jsonl"))
        port = free_port()
        service = Service("moto_server", [str(MOTO_SERVER), "-H", LOOPBACK, "-p", str(port)], env,
                          log_dir / f"moto-{port}.log")
        server = cls(service, port)
        try:
            wait_for(server.ready, timeout, interval=0.1, what=lambda: f"moto_server to answer\n{service.tail()}")
        except BaseException:
            service.stop(grace=5)
            raise
        return server

    def ready(self) -> bool:
        if not self.service.alive():
            raise RuntimeError(f"moto_server exited ({self.service.proc.returncode}):\n{self.service.tail()}")
        try:  # moto's own dashboard: not an AWS action, so not counted by INITIAL_NO_AUTH_ACTION_COUNT
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @contextlib.contextmanager
    def recorded(self):
        """The requests the server receives inside the block (a server started with ``record``): a list of
        (method, URL) filled in when the block ends."""
        def call(action: str, method: str = "POST") -> bytes:
            request = urllib.request.Request(f"{self.endpoint_url}/moto-api/recorder/{action}", method=method)
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read()

        requests: list[tuple[str, str]] = []
        call("reset-recording")
        call("start-recording")
        try:
            yield requests
        finally:
            call("stop-recording")
            for line in call("download-recording", "GET").decode().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    requests.append((entry["method"], entry["url"]))

    # ------------------------------------------------------------------------------------------ clients
    def filesystem(self, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET):
        """A fresh (not cached) s3fs filesystem on this server with explicit credentials."""
        import s3fs

        return s3fs.S3FileSystem(key=key_id, secret=secret, endpoint_url=self.endpoint_url,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True,
                                 use_listings_cache=False)

    def client(self, service: str = "s3", key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET):
        import boto3

        return boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret,
                                     region_name=REGION).client(service, endpoint_url=self.endpoint_url)

    def create_access_key(self, user: str = "imgtune-test", *, admin: bool = True) -> AccessKey:
        """An IAM user (allowed everything when ``admin``) and an access key of it: 2-3 requests, to be made
        among the first ``enforce_auth_after`` ones."""
        iam = self.client("iam")
        iam.create_user(UserName=user)
        if admin:
            iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=(
                '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return AccessKey(user=user, key_id=key["AccessKeyId"], secret=key["SecretAccessKey"])

    # ------------------------------------------------------------------------------------------ lifecycle
    def tail(self, chars: int = 4000) -> str:
        return self.service.tail(chars)

    def stop(self) -> None:
        self.service.stop(grace=10)

    def __enter__(self) -> "MotoServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def make_bucket(server: MotoServer, bucket: str, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> str:
    """Create ``bucket`` with boto3 (s3fs's ``mkdir`` sends a location constraint that us-east-1 refuses);
    returns ``s3://bucket``."""
    client = server.client("s3", key_id, secret)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def upload_folder(fs, folder: Path, prefix: str) -> list[str]:
    """Upload every file under ``folder`` to ``s3://prefix/<relative path>`` (one PUT each, s3fs
    ``pipe_file``) with the filesystem ``fs`` (:meth:`MotoServer.filesystem`); returns the URLs written."""
    folder = Path(folder)
    prefix = prefix.removeprefix("s3://").rstrip("/")
    urls = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{file.relative_to(folder).as_posix()}"
        fs.pipe_file(key, file.read_bytes())
        urls.append(f"s3://{key}")
    fs.invalidate_cache()
    return urls
