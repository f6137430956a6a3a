"""`c2m up` / `c2m down`: a real Prefect server and serve process, then nothing left."""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

from conftest import C2M, alive, free_port
from flows.config import PROJECT_ROOT


def test_up_serves_every_config_as_a_deployment_and_down_stops_exactly_that(tmp_path):
    port = free_port()
    env = {**os.environ, "C2M_STATE": str(tmp_path / "state"), "C2M_PORT": str(port)}
    for key in ("PREFECT_HOME", "PREFECT_API_URL"):
        env.pop(key, None)

    def c2m(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([C2M, *args], env=env, capture_output=True, text=True, timeout=180)

    added = PROJECT_ROOT / "configs" / f"test-added-{os.getpid()}.toml"
    try:
        assert c2m("up").returncode == 0
        status = json.loads(c2m("status").stdout)
        assert status["healthy"] and status["api"] == f"http://127.0.0.1:{port}/api"
        pids = [status["server_pid"], status["serve_pid"]]
        assert all(pids)
        names = {"demo", "wcxb"}
        for name in names:
            url = f"http://127.0.0.1:{port}/api/deployments/name/corpus-to-model/{name}"
            with urllib.request.urlopen(url, timeout=5) as r:
                assert json.load(r)["parameters"]["config"] == f"configs/{name}.toml"
        url = f"http://127.0.0.1:{port}/api/deployments/name/corpus-to-model/compare"
        with urllib.request.urlopen(url, timeout=5) as r:
            compare = json.load(r)
        assert compare["parameters"]["configs"] == ["configs/compare/quality-on.toml",
                                                    "configs/compare/quality-off.toml"]
        assert compare["entrypoint"].endswith("flows/compare.py:compare")
        assert (tmp_path / "state" / "prefect").is_dir()  # Prefect state stays project-local
        assert c2m("up").returncode == 0  # idempotent: nothing new started
        assert json.loads(c2m("status").stdout)["server_pid"] == pids[0]
        # `c2m run` uses the server that is up (the run shows in its UI) and leaves it up
        run = c2m("run", "--stage", "source", "--set", "source.pydoc_limit=1",
                  "--set", f"run.artifacts={tmp_path / 'artifacts'}")
        assert run.returncode == 0, run.stderr
        assert "using the Prefect server" in run.stderr and "starting Prefect server" not in run.stderr
        flow_run = re.search(r"/runs/flow-run/([0-9a-f-]{36})", run.stderr).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/flow_runs/{flow_run}", timeout=5) as r:
            assert json.load(r)["state_type"] == "COMPLETED"
        status = json.loads(c2m("status").stdout)
        assert status["healthy"] and [status["server_pid"], status["serve_pid"]] == pids
        # the README's command: the demo deployment, run by the serve process
        overrides = json.dumps({"source.pydoc_limit": 1, "run.artifacts": str(tmp_path / "served")})
        served = subprocess.run([str(Path(C2M).with_name("prefect")), "deployment", "run", "corpus-to-model/demo",
                                 "-p", 'stages=["source"]', "-p", f"overrides={overrides}", "--watch"],
                                env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
                                capture_output=True, text=True, timeout=180)
        assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-2000:]
        assert (tmp_path / "served" / "source" / "LATEST").is_file()
        # a second checkout (its own state folder) must not adopt this server
        other = subprocess.run([C2M, "up"], capture_output=True, text=True, timeout=60,
                               env={**env, "C2M_STATE": str(tmp_path / "other-state")})
        assert other.returncode == 1 and "did not start" in other.stderr and "C2M_PORT" in other.stderr
        # a config added while it runs: the next `c2m up` serves it, no `down` needed
        added.write_text((PROJECT_ROOT / "configs" / "demo.toml").read_text())
        up = c2m("up")
        assert up.returncode == 0, up.stderr
        assert f"configs/{added.name} added: restarting the serve process" in up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}/api/deployments/name/corpus-to-model/{added.stem}"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert json.load(r)["parameters"]["config"] == f"configs/{added.name}"
        serve_pid = json.loads(c2m("status").stdout)["serve_pid"]
        assert serve_pid not in (None, pids[1])
        again = c2m("up")  # nothing changed: nothing restarted
        assert "restarting" not in again.stdout + again.stderr
        pids[1] = serve_pid
    finally:
        added.unlink(missing_ok=True)
        down = c2m("down")
    assert down.returncode == 0
    assert not any(alive(p) for p in pids)
    status = json.loads(c2m("status").stdout)
    assert not status["healthy"] and status["server_pid"] is None
