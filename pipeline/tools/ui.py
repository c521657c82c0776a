"""`make ui`: the MLflow UI on loopback, against the project's tracking store, in the foreground.

`python -m pipeline.ui [--host 127.0.0.1] [--port 5000]` resolves the store exactly as the stages do
(`pipeline.tracking`: `MLFLOW_TRACKING_URI`, else params.yaml's `tracking.uri` with a relative SQLite path
taken from the repository root), starts `mlflow server` on it, waits until it answers and prints the address.
Ctrl-C stops it. It binds 127.0.0.1 unless told otherwise, because the UI has no authentication and can
delete runs: on a shared machine, reach it through an SSH tunnel rather than `--host 0.0.0.0`.

Experiments the UI creates keep their artifacts in `<repo>/mlartifacts/` as plain files (no artifact proxy),
like the experiments the stages create, so either side can read the other's artifacts. When
`MLFLOW_TRACKING_URI` already names an `http(s)://` server there is nothing to start: it prints that address.

The helpers (`start_server`, `wait_until_healthy`, `stop_server`, `free_port`) are what the browser test uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from pipeline.core import tracking

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# Unless the environment says otherwise. The job runner serves MLflow's GenAI jobs (scorers, prompt
# optimisation), which this project never submits; it is a second MLflow process importing everything at
# start-up, and skipping it halves the time until the UI answers (24 s to 9-12 s on a busy 2-core machine).
SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def project_store() -> str:
    """The tracking URI the stages use: MLFLOW_TRACKING_URI, else params.yaml's tracking.uri at the repo root."""
    root = tracking.repo_root()
    configured = None
    with contextlib.suppress(Exception):  # no or broken params.yaml: the default store, as the stages would
        from pipeline.core.params import read_params

        configured = read_params(root / "params.yaml").get("tracking", {}).get("uri")
    return tracking.tracking_uri(configured, root)


def server_command(store: str, artifacts: Path, host: str, port: int, workers: int = 1) -> list[str]:
    # --no-serve-artifacts: the UI reads and writes artifact files where the experiment says, instead of
    # giving new experiments `mlflow-artifacts:/` locations that a stage writing straight to SQLite can't use.
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store,
        "--default-artifact-root", str(artifacts),
        "--no-serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def start_server(store: str, artifacts: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 log: IO | None = None, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start `mlflow server` in its own process group (it forks workers), so `stop_server` stops them all.
    `env` is added to this process's environment."""
    artifacts.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        server_command(store, artifacts, host, port),
        stdout=log, stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
        env={**SERVER_DEFAULTS, **os.environ, **(env or {})},
    )


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once `<url>/health` answers; raise if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering at {url}")
        with contextlib.suppress(OSError, urllib.error.URLError), \
                urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server did not answer at {url}/health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the server and its workers: SIGTERM to the group, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 5000)")
    args = parser.parse_args(argv)

    store = project_store()
    if store.split(":", 1)[0].lower() in ("http", "https"):
        print(f"MLFLOW_TRACKING_URI names a tracking server already; open {store}")
        return 0
    if not port_is_free(args.host, args.port):
        print(f"error: {args.host}:{args.port} is in use (another `make ui`?); choose one with "
              f"`python -m pipeline.ui --port {free_port(args.host)}`", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {args.host}: anyone who can reach this machine can read and delete runs.",
              file=sys.stderr)
    artifacts = tracking.artifact_root()
    url = url_for(args.host, args.port)
    print(f"Starting the MLflow UI on {args.host}:{args.port}\n  store:     {store}\n  artifacts: {artifacts}",
          flush=True)
    proc = start_server(store, artifacts, args.host, args.port)
    # SIGTERM (from a supervisor) and Ctrl-C both stop the server group, which has its own session.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        wait_until_healthy(url, proc)
        print(f"MLflow UI: {url}   (Ctrl-C to stop)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
