"""The local Prefect server and the process serving our deployments.

Both are ordinary background processes with pid files and logs under `.c2m/` in the
project; `stop()` ends exactly those two. Prefect state (its SQLite database) lives in
`.c2m/prefect`, and the server binds to 127.0.0.1 only.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows.config import PROJECT_ROOT

STATE = Path(os.environ.get("C2M_STATE", PROJECT_ROOT / ".c2m"))
HOST = "127.0.0.1"
PORT = int(os.environ.get("C2M_PORT", "4200"))
API_URL = f"http://{HOST}:{PORT}/api"
PROCESSES = ("serve", "server")  # stop order: the runner first, then the API it talks to


def prefect_env() -> dict[str, str]:
    return {
        "PREFECT_HOME": str(STATE / "prefect"),
        "PREFECT_API_URL": API_URL,
        # a missing server is then a fast, clear error instead of a silent temporary one
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "DASK_LOGGING__DISTRIBUTED": "warning",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def configure() -> None:
    """Point this process (and its children) at the project's server. Call before
    importing prefect; settings the user exported themselves win."""
    for key, value in prefect_env().items():
        os.environ.setdefault(key, value)


def _get(path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"{API_URL}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def healthy() -> bool:
    return _get("/health")[0] == 200


def deployment_ready(name: str) -> bool:
    return _get(f"/deployments/name/corpus-to-model/{name}")[0] == 200


def _pid(name: str) -> int | None:
    path = STATE / f"{name}.pid"
    try:
        pid = int(path.read_text())
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
        except ChildProcessError:
            pass
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        path.unlink(missing_ok=True)
        return None


def _spawn(name: str, argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    log = open(STATE / f"{name}.log", "ab")
    env = {**os.environ, **prefect_env()}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=PROJECT_ROOT, env=env, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _wait(ready, name: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if _pid(name) is None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"the {name} process did not come up within {timeout:.0f} s; "
                       f"its log is {STATE / (name + '.log')}:\n{tail(name)}")


def tail(name: str, lines: int = 20) -> str:
    path = STATE / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start(deployments: tuple[str, ...] = ("demo",), log=print) -> None:
    """Start the server and the serve process unless they already run; idempotent."""
    if healthy() and not _pid("server"):
        # another checkout's server (or the user's own): its serve process would run our
        # deployments from its code into its artifacts
        raise RuntimeError(
            f"a Prefect server that this checkout did not start answers at {API_URL}. Stop it "
            f"(`c2m down` in the checkout that started it), or give this checkout its own port: "
            f"export C2M_PORT=4201")
    if healthy():
        log(f"Prefect server already up at {API_URL}")
    elif _pid("server"):
        _wait(healthy, "server", 90)
    else:
        prefect = str(Path(sys.executable).with_name("prefect"))
        _spawn("server", [prefect, "server", "start", "--host", HOST, "--port", str(PORT)])
        log(f"starting Prefect server at {API_URL} (log: {STATE / 'server.log'})")
        _wait(healthy, "server", 90)
    if not _pid("serve"):
        _spawn("serve", [sys.executable, "-m", "flows.serve"])
        log(f"serving deployments (log: {STATE / 'serve.log'})")
    _wait(lambda: all(deployment_ready(d) for d in deployments), "serve", 90)
    log(f"ready: UI at http://{HOST}:{PORT}, deployments {', '.join(deployments)}")


def stop(log=print) -> None:
    for name in PROCESSES:
        pid = _pid(name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        for _ in range(60):
            if _pid(name) is None:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
        (STATE / f"{name}.pid").unlink(missing_ok=True)
        log(f"stopped {name} (pid {pid})")
    for _ in range(40):  # the port is free again before we say so
        if not healthy():
            return
        time.sleep(0.25)


def status() -> dict:
    return {"api": API_URL, "healthy": healthy(), "state": str(STATE),
            **{f"{name}_pid": _pid(name) for name in PROCESSES}}
