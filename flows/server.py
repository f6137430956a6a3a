"""The local Prefect server and the process that runs our deployments' flow runs.

That runner is either the serve process (`c2m up`: `prefect.serve` of every deployment) or
a process worker polling a work pool (`c2m up --pool NAME`: `prefect worker start`), never
both. All are ordinary background processes with pid files and logs under `.c2m/` in the
project; `stop()` ends exactly those. Prefect state (its SQLite database, unless
PREFECT_API_DATABASE_CONNECTION_URL names another, e.g. PostgreSQL) lives in
`.c2m/prefect`, and the server binds to 127.0.0.1 only.

`c2m up` / `c2m demo` start the server and a runner and leave them running. `c2m run` needs only the API:
it uses the server when one is up, and otherwise starts one for itself (marked in
`server.owner`) that the last run using it stops; `c2m up` adopts such a server.

Every flow run records the process that runs it (`record_process`, a flow hook), so that
each start can mark Crashed the runs whose process is gone (`mark_crashed`): a kill -9
leaves no run RUNNING forever.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows.config import DEFAULTS, PROJECT_ROOT, STATE
HOST = "127.0.0.1"
PORT = int(os.environ.get("C2M_PORT", "4200"))
API_URL = f"http://{HOST}:{PORT}/api"
COMPARE_DEPLOYMENT = "compare"  # served beside one deployment per config (flows/deployments.py)
RUNNERS = ("serve", "worker")   # what runs deployments' flow runs: one of the two at a time
PROCESSES = (*RUNNERS, "server")  # stop order: the runner first, then the API it talks to
OWNER = STATE / "server.owner"   # present while the server belongs to `c2m run`s, not to `c2m up`
USERS = STATE / "runs"           # one file per live `c2m run` process using the server


def prefect_env() -> dict[str, str]:
    return {
        "PREFECT_HOME": str(STATE / "prefect"),
        "PREFECT_API_URL": API_URL,
        # a missing server is then a fast, clear error instead of a silent temporary one
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # a worker picks a new run up within 2 s, not 10
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


def deployment_ready(name: str, pool: str | None = None) -> bool:
    """Whether corpus-to-model/<name> exists and routes its runs to `pool` (None: to the
    serve process; a deployment left by `c2m up --pool` is not ready until serve took it over)."""
    code, body = _get(f"/deployments/name/corpus-to-model/{name}")
    return code == 200 and json.loads(body).get("work_pool_name") == pool


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _pid(name: str) -> int | None:
    path = STATE / f"{name}.pid"
    try:
        pid = int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def _lock():
    """One c2m process at a time decides to start or stop the server."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "server.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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


def _refuse_foreign() -> None:
    if healthy() and not _pid("server"):
        # another checkout's server (or the user's own): its serve process would run our
        # deployments from its code into its artifacts
        raise RuntimeError(
            f"a Prefect server that this checkout did not start answers at {API_URL}. Stop it "
            f"(`c2m down` in the checkout that started it), or give this checkout its own port: "
            f"export C2M_PORT=4201")


def _spawn_server(log) -> None:
    prefect = str(Path(sys.executable).with_name("prefect"))
    _spawn("server", [prefect, "server", "start", "--host", HOST, "--port", str(PORT)])
    log(f"starting Prefect server at {API_URL} (log: {STATE / 'server.log'})")


def served_configs() -> list[str]:
    """The configs to serve as deployments: every configs/*.toml but the defaults."""
    return [p.stem for p in sorted((PROJECT_ROOT / "configs").glob("*.toml")) if p != DEFAULTS]


def _serving() -> list[str] | None:
    """The configs the serve process serves (its command line names them), None if it is down."""
    import psutil

    pid = _pid("serve")
    try:
        command = [] if pid is None else psutil.Process(pid).cmdline()  # python -m flows.serve ...
    except psutil.NoSuchProcess:
        return None
    return command[command.index("flows.serve") + 1:] if "flows.serve" in command else None


def _restart_serve_if_configs_changed(wanted: list[str], log) -> None:
    """A serve process keeps the deployments it started with: when configs were added or
    removed since, restart it, unless it is running flow runs (a restart would kill them)."""
    import psutil

    serving = _serving()
    if serving is None or serving == wanted:
        return
    change = ", ".join([f"configs/{n}.toml added" for n in wanted if n not in serving]
                       + [f"configs/{n}.toml removed" for n in serving if n not in wanted])
    try:
        runs = psutil.Process(_pid("serve")).children()  # the runner runs each flow run in a child
    except (psutil.NoSuchProcess, ValueError):
        return  # it ended meanwhile: start() starts a new one
    if runs:
        log(f"not serving the change yet ({change}): the serve process is running {len(runs)} "
            f"flow run(s); run `c2m up` again when they end to restart it")
        return
    log(f"{change}: restarting the serve process")
    _stop("serve", log)


def start(log=print, pool: str | None = None) -> None:
    """Start the server and a runner unless they already run: the serve process, or with
    `pool` a process worker of that work pool (with every deployment registered into it).
    Idempotent; a runner of the other kind (or pool) is stopped first, and a serve process
    started before configs were added or removed is restarted to serve them. They stay up
    until `c2m down`, also when a `c2m run` had started the server."""
    with _lock():
        _refuse_foreign()
        if not _pid("server"):
            _spawn_server(log)
        elif OWNER.exists():
            log(f"keeping the Prefect server that a `c2m run` started at {API_URL}")
        OWNER.unlink(missing_ok=True)  # from now on it stays up until `c2m down`
    _wait(healthy, "server", 90)
    mark_crashed(log)
    wanted = served_configs()
    if pool is not None:
        _start_worker(pool, wanted, log)
        return
    _stop_runners(_other_runners(None), log)
    _restart_serve_if_configs_changed(wanted, log)
    if not _pid("serve"):
        _spawn("serve", [sys.executable, "-m", "flows.serve", *wanted])
        log(f"serving deployments (log: {STATE / 'serve.log'})")
    serving = [*(_serving() or wanted), COMPARE_DEPLOYMENT]  # a serve process that died: _wait says so
    _wait(lambda: all(deployment_ready(d) for d in serving), "serve", 90)
    log(f"ready: UI at http://{HOST}:{PORT}, deployments {', '.join(serving)}")


def pool() -> str | None:
    """The work pool the worker that c2m started polls (its command line names it), or None."""
    import psutil

    pid = _pid("worker")
    try:
        command = [] if pid is None else psutil.Process(pid).cmdline()  # prefect worker start --pool P
    except psutil.NoSuchProcess:
        return None
    return command[command.index("--pool") + 1] if "--pool" in command else None


def _other_runners(wanted_pool: str | None) -> list[str]:
    """The runners to stop for the one wanted (the serve process when a pool is wanted, a
    worker of another pool, or a worker when serve is wanted): two runners would both take
    the deployments' runs. One that is running flow runs is an error, and nothing stops."""
    import psutil

    current = pool()
    others = []
    for name, other in (("serve", wanted_pool is not None),
                        ("worker", current is not None and current != wanted_pool)):
        pid = _pid(name)
        if pid is None or not other:
            continue
        try:
            runs = psutil.Process(pid).children()  # each flow run is a child process
        except psutil.NoSuchProcess:
            continue
        if runs:
            what = "the serve process" if name == "serve" else f"the worker of work pool {current!r}"
            raise RuntimeError(f"{what} is running {len(runs)} flow run(s); switching would kill "
                               f"them: wait for them to end (or `c2m down`), then run this again")
        others.append(name)
    return others


def _stop_runners(names: list[str], log) -> None:
    for name in names:
        log(f"stopping the {'serve process' if name == 'serve' else 'worker of work pool ' + repr(pool())}: "
            "one runner at a time")
        _stop(name, log)


def _start_worker(pool_name: str, configs: list[str], log) -> None:
    """Register the deployments into the process work pool (created if absent), then stop
    the other runner and start `prefect worker start --pool` unless it already runs. A
    failed registration leaves the runner that was up as it was."""
    others = _other_runners(pool_name)
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "deploy.log", "wb") as out:
        done = subprocess.run([sys.executable, "-m", "flows.deployments", "--pool", pool_name, *configs],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=PROJECT_ROOT, env={**os.environ, **prefect_env()}, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"registering the deployments into work pool {pool_name!r} failed: "
                           f"{tail('deploy', 1).removeprefix('error: ')} (log: {STATE / 'deploy.log'})")
    log(f"registered deployments {', '.join([*configs, 'compare'])} in work pool {pool_name!r}")
    _stop_runners(others, log)
    if not _pid("worker"):
        prefect = str(Path(sys.executable).with_name("prefect"))
        _spawn("worker", [prefect, "worker", "start", "--pool", pool_name, "--type", "process"])
        log(f"starting a process worker for work pool {pool_name!r} (log: {STATE / 'worker.log'})")
    _wait(lambda: worker_online(pool_name), "worker", 90)
    log(f"ready: UI at http://{HOST}:{PORT}, work pool {pool_name!r} with a worker online")


def worker_online(pool_name: str) -> bool:
    request = urllib.request.Request(f"{API_URL}/work_pools/{pool_name}/workers/filter", data=b"{}",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return any(w["status"] == "ONLINE" for w in json.load(r))
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def for_run(log=print):
    """The API for a flow run in this process (`c2m run`): the server when one is up (the
    run then shows in its UI), otherwise one started for this run and stopped when the
    last run using it ends. Never the serve process."""
    me = USERS / str(os.getpid())
    try:
        with _lock():
            _refuse_foreign()
            if _pid("server"):
                log(f"using the Prefect server at {API_URL}")
            else:
                OWNER.write_text("run")
                _spawn_server(log)
            USERS.mkdir(parents=True, exist_ok=True)
            me.touch()
        _wait(healthy, "server", 90)
        mark_crashed(log)
        yield
    finally:
        with _lock():
            me.unlink(missing_ok=True)
            others = []
            for user in USERS.glob("*"):
                if user.name.isdigit() and _alive(int(user.name)):
                    others.append(user)
                else:
                    user.unlink()  # a run that was killed
            if OWNER.exists() and not others and not any(_pid(r) for r in RUNNERS):
                _flush_prefect()
                _stop("server", log)
                OWNER.unlink(missing_ok=True)


def _flush_prefect() -> None:
    """Send the logs and events this process still holds before their server goes away."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def _stop(name: str, log) -> None:
    pid = _pid(name)
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    for _ in range(60):
        if _pid(name) is None:
            break
        time.sleep(0.5)
    else:
        os.killpg(pid, signal.SIGKILL)
    (STATE / f"{name}.pid").unlink(missing_ok=True)
    log(f"stopped {name} (pid {pid})")
    if name == "server":
        for _ in range(40):  # the port is free again before we say so
            if not healthy():
                return
            time.sleep(0.25)


def stop(log=print) -> None:
    with _lock():
        for name in PROCESSES:
            _stop(name, log)
        OWNER.unlink(missing_ok=True)


def status() -> dict:
    runner = next((name for name in RUNNERS if _pid(name)), None)
    return {"api": API_URL, "healthy": healthy(), "state": str(STATE),
            "runner": runner, "pool": pool() if runner == "worker" else None,
            **{f"{name}_pid": _pid(name) for name in PROCESSES}}


# -- flow runs whose process is gone -------------------------------------------------

def record_process(flow, flow_run, state) -> None:
    """Flow `on_running` hook: store `host:pid` of the process running this flow run in
    its infrastructure_pid (Prefect's process workers use the same form)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}")


def _process_gone(owner: str | None, started) -> bool:
    """Whether the process that `record_process` stored for a run started at `started`
    is gone. Runs without a record, or recorded on another host, are not ours to judge."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    import psutil

    try:
        created = psutil.Process(int(pid)).create_time()
    except psutil.NoSuchProcess:
        return True
    # the pid was reused by a process started after the run began
    return started is not None and created > started.timestamp() + 1


def mark_crashed(log=print) -> list[str]:
    """Set Crashed every RUNNING flow run (and its RUNNING task runs) whose process is gone.
    Returns the ids of the runs it marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                                FlowRunFilterStateType, TaskRunFilter,
                                                TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    marked: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
            for run in running:
                if not _process_gone(run.infrastructure_pid, run.start_time):
                    continue
                message = (f"its process ({run.infrastructure_pid}) ended without reporting a "
                           "final state (killed?); marked Crashed by c2m")
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                        type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
                for task_run in tasks:
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                log(f"flow run {run.name} ({run.id}) was left RUNNING by process "
                    f"{run.infrastructure_pid}, which is gone: marked Crashed")
                marked.append(str(run.id))
    except Exception as exc:  # housekeeping: it must not stop the work this start is for
        log(f"warning: could not look for crashed flow runs at {API_URL}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return marked
