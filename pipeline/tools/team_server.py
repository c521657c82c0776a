"""`make team-server`: one MLflow tracking server for a team, on PostgreSQL, serving the runs' artifacts itself.

`python -m pipeline team_server [--host 127.0.0.1] [--port 5000] [--dir .team]` starts, in the foreground:

- the backend store: `MLFLOW_BACKEND_URI` when it names a database the team already has (say
  `postgresql://mlflow:secret@db.internal/mlflow`), else a PostgreSQL cluster of its own under `<dir>/postgres`
  (created on first use, kept between starts). That cluster listens on a Unix socket in `<dir>/` only, never on
  a TCP port, so nobody but the server's owner reaches the database;
- `mlflow server --serve-artifacts`: clients upload and download artifacts through the server (the experiments
  it creates get `mlflow-artifacts:/` locations), which keeps them under `<dir>/artifacts` unless
  `MLFLOW_ARTIFACTS_DESTINATION` names another place (`s3://bucket/mlflow`, a shared disk). Teammates need
  nothing but the server's address: `export MLFLOW_TRACKING_URI=http://<machine>:<port>`.

It binds 127.0.0.1 unless told otherwise: the server has no login and anyone who reaches it can delete runs,
so opening it (`--host 0.0.0.0`) is for a network the team trusts, and the output says so. MLflow accepts only
requests addressed to localhost or a private IP unless `--allowed-hosts` names the host teammates type.
Ctrl-C (or SIGTERM) stops the server and then the cluster.

PostgreSQL refuses to run as root: as root the cluster is owned and run by the `postgres` user of Debian's
package (`make postgres` installs it), so `<dir>` must be reachable by that user. The helpers (`find_postgres`,
`start_postgres`, `stop_postgres`, `start_server`) are what tests/test_team_server.py runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from pipeline.core import tracking
from pipeline.tools import ui

DB_NAME = "mlflow"
DB_USER = "mlflow"
#: Debian's package puts the server programs here, off PATH; a version-less `pg_ctl` on PATH wins.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
#: A Unix socket's path is limited to about 107 bytes; deeper folders get a socket folder under /tmp.
_MAX_SOCKET_DIR = 80


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server programs here, or no user to run them as."""


def find_postgres() -> Path:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else the newest Debian version."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", folder.parent.name)) or (0,)

    candidates += sorted(Path("/").glob(DEBIAN_BINDIRS.lstrip("/")), key=version, reverse=True)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresUnavailable("PostgreSQL's server programs (initdb, pg_ctl, postgres) are not installed: "
                              "`make postgres` installs Debian's package (as root)")


def _run_as() -> str | None:
    """The user the cluster runs as: None (this user) unless we are root, whom PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root, and there is no `postgres` user to run PostgreSQL as "
                                  "(Debian's postgresql package creates it)") from None
    return "postgres"


@dataclasses.dataclass(frozen=True)
class Postgres:
    """A running cluster of ours: where it lives and how MLflow connects to it."""

    bindir: Path
    data: Path
    socket_dir: Path
    port: int
    user: str | None  # the OS user running it (None: this process's user)
    log: Path

    @property
    def uri(self) -> str:
        return store_uri(self.socket_dir, self.port)


def store_uri(socket_dir: Path, port: int = 5432) -> str:
    """The backend-store URI of a cluster of ours, through its socket folder (`<dir>/run` for short paths)."""
    # psycopg (SQLAlchemy 2.1's default PostgreSQL driver) reads the socket folder from `host`.
    return f"postgresql://{DB_USER}@/{DB_NAME}?host={socket_dir}&port={port}"


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    if user is None:
        return cmd
    # util-linux's runuser lives in /usr/sbin, which a minimal PATH (cron, CI) may leave out.
    runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "runuser"
    return [runuser, "-u", user, "--", *cmd]


def _check(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def _owned_folder(path: Path, user: str | None, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if user is not None:
        shutil.chown(path, user, user)
    path.chmod(mode)
    return path


def start_postgres(folder: Path, port: int = 5432, bindir: Path | None = None) -> Postgres:
    """Start (creating on first use) the cluster in `folder`/postgres with an `mlflow` database; wait for it.

    Connections come only through a Unix socket in a folder of the cluster's owner (no TCP listener), so the
    passwordless `trust` login reaches nobody else; `port` only names the socket file.
    """
    bindir = bindir or find_postgres()
    user = _run_as()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if user is not None and subprocess.run(_as_user(user, ["test", "-x", str(folder)])).returncode != 0:
        raise PostgresUnavailable(f"PostgreSQL runs as user {user} here (it refuses root), who cannot reach "
                                  f"{folder}: choose a folder it can, e.g. `make team-server TEAM_DIR=/srv/mlflow`")
    data = folder / "postgres"
    socket_dir = folder / "run"
    if len(str(socket_dir)) > _MAX_SOCKET_DIR:
        socket_dir = Path(tempfile.mkdtemp(prefix="pg-"))
    _owned_folder(socket_dir, user)
    log = folder / "postgres.log"
    log.touch()
    if user is not None:
        shutil.chown(log, user, user)
    if not (data / "PG_VERSION").is_file():
        _owned_folder(data, user)
        _check(_as_user(user, [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust",
                               "-E", "UTF8", "--no-instructions"]),
               f"initdb {data} (as {user or 'this user'}: it must reach that folder)")
    options = f"-c listen_addresses='' -c unix_socket_directories='{socket_dir}' -p {port}"
    _check(_as_user(user, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                           "-w", "-t", "60", "start"]),
           f"pg_ctl start (log: {log})")
    pg = Postgres(bindir, data, socket_dir, port, user, log)
    try:
        _create_database(pg)
    except BaseException:
        stop_postgres(pg)
        raise
    return pg


def _create_database(pg: Postgres) -> None:
    import psycopg

    # autocommit: CREATE DATABASE cannot run inside a transaction.
    with psycopg.connect(dbname="postgres", user=DB_USER, host=str(pg.socket_dir), port=pg.port,
                         autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def stop_postgres(pg: Postgres) -> None:
    """Stop the cluster (fast shutdown: open sessions are ended, committed data kept)."""
    subprocess.run(_as_user(pg.user, [str(pg.bindir / "pg_ctl"), "-D", str(pg.data), "-m", "fast", "-w",
                                      "stop"]), capture_output=True, timeout=120)


def server_command(store: str, artifacts: str, host: str, port: int, workers: int = 2,
                   allowed_hosts: str | None = None) -> list[str]:
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store,
        "--serve-artifacts",
        "--artifacts-destination", artifacts,
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]
    return cmd + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])


def start_server(store: str, artifacts: str, host: str = ui.DEFAULT_HOST, port: int = ui.DEFAULT_PORT,
                 log: IO | None = None, workers: int = 2, allowed_hosts: str | None = None,
                 env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """`mlflow server` on `store`, proxying artifacts to `artifacts`, in its own process group
    (`ui.stop_server` stops it and its workers)."""
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        server_command(store, artifacts, host, port, workers, allowed_hosts),
        stdout=log, stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
        env={**ui.SERVER_DEFAULTS, **os.environ, **(env or {})},
    )


@contextlib.contextmanager
def backend_store(folder: Path) -> Iterator[tuple[str, str]]:
    """`MLFLOW_BACKEND_URI`, or our own cluster in `folder` for as long as the block runs.
    Yields the URI and a description to print (no password)."""
    given = os.environ.get("MLFLOW_BACKEND_URI")
    if given:
        yield given, re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", given)
        return
    pg = start_postgres(folder)
    try:
        yield pg.uri, f"PostgreSQL {pg.bindir.parent.name} cluster in {pg.data} (Unix socket only)"
    finally:
        stop_postgres(pg)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=ui.DEFAULT_HOST,
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=ui.DEFAULT_PORT, help="port (default 5000)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="the server's own folder: cluster, artifacts, logs (default <repo>/.team)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="host names teammates use in the URL, when not localhost or a private IP")
    args = parser.parse_args(argv)

    folder = (args.dir or tracking.repo_root() / ".team").resolve()
    if not ui.port_is_free(args.host, args.port):
        print(f"error: {args.host}:{args.port} is in use; choose another with PORT=...", file=sys.stderr)
        return 2
    artifacts = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or str(folder / "artifacts")
    url = ui.url_for(args.host, args.port)
    folder.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's stop goes through the same clean-up as Ctrl-C
    try:
        with backend_store(folder) as (store, shown):
            print(f"Team tracking server on {args.host}:{args.port}\n  backend store: {shown}\n"
                  f"  artifacts:     {artifacts} (served by the server)", flush=True)
            return _serve(store, artifacts, folder, url, args)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _serve(store: str, artifacts: str, folder: Path, url: str, args: argparse.Namespace) -> int:
    """Run the server until it exits or we are interrupted; it is stopped before the database is."""
    with open(folder / "mlflow-server.log", "a") as log:
        proc = start_server(store, artifacts, args.host, args.port, log, args.workers, args.allowed_hosts)
        try:
            # A fresh database gets MLflow's schema first: tens of seconds.
            ui.wait_until_healthy(url, proc, timeout=300)
            address = url if args.host in ("127.0.0.1", "localhost") else f"http://<this machine>:{args.port}"
            print(f"Ready: {url}   (log: {log.name}; Ctrl-C stops the server and the database)\n"
                  f"Everyone using it runs:\n  export MLFLOW_TRACKING_URI={address}", flush=True)
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"WARNING: bound to {args.host}: anyone who can reach this machine can read and delete "
                      "runs.", file=sys.stderr)
            return proc.wait()
        finally:
            ui.stop_server(proc)

if __name__ == "__main__":
    sys.exit(main())
