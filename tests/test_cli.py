"""The `c2m` exit-code contract, run as a user runs it (subprocesses of the console script):
0 done, 1 failed (one `error:` line, the traceback in a log file it names), 2 bad command
line or config, 130 interrupted. And `c2m run` with the Prefect server: it stops the one it
started, and a run killed with kill -9 is marked Crashed at the next start."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import C2M, alive, free_port



def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
            return True
    except OSError:
        return False


def api(port: int, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", data=data,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def environment(state: Path, port: int) -> dict[str, str]:
    env = {**os.environ, "C2M_STATE": str(state), "C2M_PORT": str(port)}
    for key in ("PREFECT_HOME", "PREFECT_API_URL"):
        env.pop(key, None)
    return env


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return environment(tmp_path / "state", free_port())


def c2m(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([C2M, *args], env=env, capture_output=True, text=True, timeout=timeout)


# -- usage errors, --version, -h: no server, about a second each ----------------------

@pytest.mark.parametrize("args, says", [
    (["export"], "Missing option '--out'"),
    (["run", "--set", "train.max_steps"], "'train.max_steps' should look like KEY=VALUE"),
    (["stage", "train", "--pin", "shard"], "'shard' should look like KEY=VALUE"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["ls", "--no-such-option"], "No such option: --no-such-option"),
    (["generate", "-n", "many"], "Invalid value for '-n'"),
])
def test_usage_errors_print_a_short_usage_and_exit_2(env, args, says):
    result = c2m(env, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"Usage: c2m {args[0] if args[0] != 'no-such-command' else ''}")
    assert lines[-1].startswith("Error: ") and says in lines[-1]
    assert len(lines) <= 5 and "Traceback" not in result.stderr
    assert not (Path(env["C2M_STATE"]) / "logs").exists()  # nothing to log: the line says it all


def test_version_and_h_exit_0(env):
    version = c2m(env, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"corpus-to-model {importlib.metadata.version('corpus-to-model')}"
    for args in (["-h"], ["--help"], ["run", "-h"]):
        result = c2m(env, *args)
        assert result.returncode == 0, result.stderr
        assert "Usage: c2m" in result.stdout and result.stderr == ""
    assert "Exit codes" in c2m(env, "-h").stdout


def test_bad_config_values_are_one_line_each_and_nothing_starts(env):
    result = c2m(env, "run", "--set", "train.max_steps=many")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.max_steps" in lines[0]
    assert "many" in lines[0]
    assert not (Path(env["C2M_STATE"]) / "server.pid").exists()  # before any server
    result = c2m(env, "run", "--set", "train.max_steps=many", "--set", "train.learning_rate=-1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


# -- a failing demo: a stand-in API on the port answers what `c2m demo` polls, so the ------
# -- real `prefect deployment run` fails at once, without training anything -----------------

STAND_IN_API = """
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        known = self.path == "/api/health" or self.path.startswith("/api/deployments/name/corpus-to-model/")
        body = b"true" if self.path == "/api/health" else b"{}"
        self.send_response(200 if known else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_failed_demo_exits_non_zero(env):
    port = int(env["C2M_PORT"])
    state = Path(env["C2M_STATE"])
    stand_in = subprocess.Popen([sys.executable, "-c", STAND_IN_API, str(port)])
    try:
        deadline = time.time() + 30
        while not answers(port) and time.time() < deadline:
            time.sleep(0.2)
        state.mkdir(parents=True)
        for name in ("server", "serve"):  # as if `c2m up` had started them
            (state / f"{name}.pid").write_text(str(stand_in.pid))
        result = c2m(env, "demo", timeout=120)
    finally:
        stand_in.kill()
        stand_in.wait()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "prefect deployment run corpus-to-model/demo" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the demo run failed") and str(state / "serve.log") in last


# -- `c2m run` and the Prefect server: real servers, one state folder (one database) -------

@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("c2m-run") / "state"


@pytest.fixture
def run_env(state):
    env = environment(state, free_port())
    yield env
    c2m(env, "down")  # whatever a failed test left


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(pattern, path.read_text() if path.exists() else "")
        if found:
            return found
        assert proc.poll() is None, f"c2m ended ({proc.returncode}) before {pattern!r}:\n{path.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{path.read_text()}")


def start_run(env: dict[str, str], err: Path, *args: str) -> subprocess.Popen:
    """A `c2m run` of the source stage alone: the whole pydoc corpus, which takes minutes."""
    return subprocess.Popen([C2M, "run", "--stage", "source", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"))


def test_a_failed_run_prints_one_error_line_logs_the_traceback_and_stops_its_server(run_env, tmp_path):
    store = tmp_path / "not-a-folder"
    store.write_text("a file where the artifact root should be")  # an OSError inside a stage
    result = c2m(run_env, "run", "--stage", "source", "--set", "source.pydoc_limit=1",
                 "--set", f"run.artifacts={store}", timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and str(store) in errors[0], result.stderr  # names the file
    assert lines[-2] == errors[0]
    log = Path(lines[-1].removeprefix("the full traceback is in "))
    assert log.parent == Path(run_env["C2M_STATE"]) / "logs" and log.is_file(), lines[-1]
    assert "Traceback (most recent call last)" in log.read_text() and str(store) in log.read_text()
    assert "Traceback" not in result.stderr and len(lines) < 40  # Prefect's one-liners, no traceback
    started = re.search(r"starting Prefect server at http://127.0.0.1:(\d+)/api", result.stderr)
    assert started and int(started.group(1)) == int(run_env["C2M_PORT"])
    stopped = re.search(r"stopped server \(pid (\d+)\)", result.stderr)
    assert stopped and not alive(int(stopped.group(1))) and not answers(int(run_env["C2M_PORT"]))


def test_a_killed_run_is_marked_crashed_and_ctrl_c_exits_130(run_env, tmp_path):
    port = int(run_env["C2M_PORT"])
    state = Path(run_env["C2M_STATE"])
    artifacts = ("--set", f"run.artifacts={tmp_path / 'artifacts'}")
    first_err, second_err = tmp_path / "first.err", tmp_path / "second.err"
    first = start_run(run_env, first_err, *artifacts)
    second = None
    try:
        wait_for(first_err, r"source: building", first)
        killed = wait_for(first_err, r"/runs/flow-run/([0-9a-f-]{36})", first).group(1)
        server_pid = int((state / "server.pid").read_text())
        tasks = {"flow_runs": {"id": {"any_": [killed]}}}
        deadline = time.time() + 60  # task runs reach the server as events, a moment later
        while not api(port, "/task_runs/filter", tasks) and time.time() < deadline:
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert api(port, f"/flow_runs/{killed}")["state_type"] == "RUNNING"  # what kill -9 leaves
        assert [t["state_type"] for t in api(port, "/task_runs/filter", tasks)] == ["RUNNING"]

        # the next start finds the server the killed run left, marks its run Crashed, uses it
        second = start_run(run_env, second_err, *artifacts)
        wait_for(second_err, r"source: building", second)
        # held mid-source while its server is checked: on a fast machine the whole stage takes
        # ~10 s, less than these checks may under load, and a finished run has nothing to stop
        second.send_signal(signal.SIGSTOP)
        text = second_err.read_text()
        assert "source: wrote" not in text, "the run ended its stage before it could be held"
        assert "using the Prefect server" in text and f"({killed}) was left RUNNING" in text
        run = api(port, f"/flow_runs/{killed}")
        assert run["state_type"] == "CRASHED" and "marked Crashed by c2m" in run["state"]["message"]
        assert run["infrastructure_pid"] == f"{socket.gethostname()}:{first.pid}"
        assert [t["state_type"] for t in api(port, "/task_runs/filter", tasks)] == ["CRASHED"]

        # Ctrl-C once it runs again: a signal sent while it is stopped would wait for whichever
        # of its threads wakes first, where a terminal's Ctrl-C reaches the running main thread
        second.send_signal(signal.SIGCONT)
        second.send_signal(signal.SIGINT)
        code = second.wait(timeout=120)
        assert code == 130, f"exit {code} after Ctrl-C; its stderr:\n{second_err.read_text()[-4000:]}"
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    text = second_err.read_text()
    assert "Traceback" not in text and "error:" not in text
    # the server the killed run had started belonged to runs only: the last one stopped it
    assert f"stopped server (pid {server_pid})" in text
    assert not alive(server_pid) and not answers(port) and not (state / "server.pid").exists()


def test_a_ctrl_c_that_prefect_drops_once_the_run_is_final_is_raised_again(prefect_harness):
    """Prefect's flow engine logs and drops a KeyboardInterrupt that lands after the run's
    state is final (here in an on_completion hook); `c2m run` raises it again, so it exits
    130 (main turns a KeyboardInterrupt into 130: the killed-run test above)."""
    from prefect import flow

    from flows.cli import _ctrl_c_kept

    def ctrl_c(flow, run, state):
        os.kill(os.getpid(), signal.SIGINT)

    @flow(on_completion=[ctrl_c])
    def finishes() -> int:
        return 1

    state = finishes(return_state=True)  # without it: dropped, the run completed
    assert state.is_completed()
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_kept():
            state = finishes(return_state=True)
    assert state.is_completed()  # it came after the run was final
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with _ctrl_c_kept():  # no Ctrl-C, nothing raised
        assert flow(lambda: 2, name="quiet")() == 2


def test_sigterm_exits_143_after_the_same_clean_up(run_env, tmp_path):
    port = int(run_env["C2M_PORT"])
    err = tmp_path / "run.err"
    proc = start_run(run_env, err, "--set", f"run.artifacts={tmp_path / 'artifacts'}")
    try:
        wait_for(err, r"source: building", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert "Traceback" not in text and "stopped server" in text and not answers(port)
    assert not list((tmp_path / "artifacts").glob("*/.tmp-*"))  # nothing half-written is left
