"""`c2m up --pool`: the deployments in a process work pool, run by `prefect worker start`
through `prefect deployment run`; and the same on a throwaway PostgreSQL cluster (when a
`postgres` binary is here) instead of SQLite."""
from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import C2M, alive, free_port

PREFECT = str(Path(C2M).with_name("prefect"))


def api(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api{path}", timeout=10) as r:
        return json.load(r)


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "C2M_STATE": str(tmp_path / "state"), "C2M_PORT": str(free_port())}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the test chooses the database
    env.update(extra)
    # what a user exports to use the `prefect` CLI against the project's server
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['C2M_PORT']}/api"
    env["PREFECT_HOME"] = str(tmp_path / "state" / "prefect")
    return env


def c2m(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([C2M, *args], env=env, capture_output=True, text=True, timeout=240)


def run_through_worker(env: dict[str, str], artifacts: Path) -> dict:
    """`prefect deployment run corpus-to-model/demo` of the source stage alone (one doc): the
    flow run, which must have completed in the worker that `c2m up --pool` started."""
    overrides = {"source.pydoc_limit": 1, "run.artifacts": str(artifacts)}
    done = subprocess.run([PREFECT, "deployment", "run", "corpus-to-model/demo", "-p", 'stages=["source"]',
                           "-p", f"overrides={json.dumps(overrides)}", "--watch"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
    run = api(int(env["C2M_PORT"]), f"/flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED"
    worker_log = (Path(env["C2M_STATE"]) / "worker.log").read_text()
    assert f"submitting flow run '{run_id}'" in worker_log  # the worker ran it, nothing else
    assert (artifacts / "source" / "LATEST").is_file()
    return run


def up_with_pool(env: dict[str, str], pool: str) -> dict:
    up = c2m(env, "up", "--pool", pool)
    assert up.returncode == 0, up.stdout + up.stderr
    status = json.loads(c2m(env, "status").stdout)
    assert status["healthy"] and status["runner"] == "worker" and status["pool"] == pool
    assert status["worker_pid"] and status["server_pid"] and status["serve_pid"] is None
    return status


def down_leaves_nothing(env: dict[str, str], pids: list[int]) -> None:
    assert c2m(env, "down").returncode == 0
    assert not any(alive(pid) for pid in pids)
    status = json.loads(c2m(env, "status").stdout)
    assert not status["healthy"] and status["runner"] is None


def test_up_pool_runs_deployments_through_a_worker_and_switching_keeps_one_runner(tmp_path):
    env = environment(tmp_path)
    port = int(env["C2M_PORT"])
    pids: list[int] = []
    try:
        status = up_with_pool(env, "c2m-test")
        pids += [status["server_pid"], status["worker_pid"]]
        pool = api(port, "/work_pools/c2m-test")
        assert pool["type"] == "process"
        for name in ("demo", "wcxb", "compare"):
            deployment = api(port, f"/deployments/name/corpus-to-model/{name}")
            assert deployment["work_pool_name"] == "c2m-test"
            # local code: imported as a module, run in this checkout (no remote storage)
            assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
                "directory": str(Path(__file__).resolve().parents[1])}}]
        assert api(port, "/deployments/name/corpus-to-model/demo")["parameters"] == {"config": "configs/demo.toml"}
        assert api(port, "/deployments/name/corpus-to-model/compare")["parameters"]["seeds"] == 2
        run = run_through_worker(env, tmp_path / "artifacts")
        assert run["work_pool_name"] == "c2m-test"
        # back to serve: the worker goes, the deployments leave the pool, one runner again
        up = c2m(env, "up")
        assert up.returncode == 0, up.stderr
        assert "stopping the worker of work pool 'c2m-test'" in up.stdout
        status = json.loads(c2m(env, "status").stdout)
        pids.append(status["serve_pid"])
        assert status["runner"] == "serve" and status["pool"] is None and status["worker_pid"] is None
        assert not alive(pids[1])
        assert api(port, "/deployments/name/corpus-to-model/demo")["work_pool_name"] is None
    finally:
        down_leaves_nothing(env, [p for p in pids if p])


# -- PostgreSQL: a throwaway cluster on 127.0.0.1 -------------------------------------------

def postgres_bin() -> Path | None:
    """The folder of postgres, initdb and pg_ctl: on PATH, or Debian's postgresql package."""
    found = shutil.which("postgres")
    candidates = [Path(found).parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=lambda p: int(Path(p).parent.name), reverse=True)]
    return next((c for c in candidates if all((c / b).exists() for b in ("postgres", "initdb", "pg_ctl"))),
                None)


@contextlib.contextmanager
def postgres_cluster():
    """initdb a cluster in a temporary folder, start it on 127.0.0.1 on a free port, create the
    database `prefect`; yield its URL. Stops the cluster and removes the folder after. PostgreSQL
    refuses to run as root: as root it runs as `nobody`."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no postgres binary (on PATH or /usr/lib/postgresql/*/bin): install Debian's "
                    "`postgresql` package to run the Prefect-on-PostgreSQL test")
    owner = {}
    folder = Path(tempfile.mkdtemp(prefix="c2m-pg-"))
    if os.geteuid() == 0:
        owner = {"user": "nobody", "group": pwd.getpwnam("nobody").pw_gid}
        os.chown(folder, pwd.getpwnam("nobody").pw_uid, owner["group"])
    port = free_port()
    data = folder / "data"

    def pg(*argv: str) -> None:
        subprocess.run([str(bin_dir / argv[0]), *argv[1:]], check=True, capture_output=True, timeout=60, **owner)

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "postgres.log"), "-w",
           "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F", "start")
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        asyncio.run(postgres_query(port, "postgres", "CREATE DATABASE prefect"))
        yield port, f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        try:
            if (data / "postmaster.pid").exists():
                pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
                assert not running(postmaster)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def running(pid: int) -> bool:
    """Alive and not a zombie (the postmaster is pg_ctl's child, reaped by init, not by us)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def postgres_query(port: int, database: str, sql: str):
    import asyncpg  # Prefect's own PostgreSQL driver: installed with prefect

    connection = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=database)
    try:
        return await connection.fetch(sql)
    finally:
        await connection.close()


def test_prefect_on_postgresql_runs_the_flow_and_keeps_its_runs_there(tmp_path):
    with postgres_cluster() as (pg_port, url):
        env = environment(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=url)
        pids: list[int] = []
        try:
            started = time.time()
            status = up_with_pool(env, "c2m-pg")
            pids += [status["server_pid"], status["worker_pid"]]
            run = run_through_worker(env, tmp_path / "artifacts")
            took = time.time() - started
        finally:
            down_leaves_nothing(env, [p for p in pids if p])
        rows = asyncio.run(postgres_query(pg_port, "prefect", "SELECT f.name AS flow, r.id::text AS id, "
                                          "r.state_type::text AS state FROM flow_run r JOIN flow f ON f.id = r.flow_id"))
        assert [(r["flow"], r["id"], r["state"]) for r in rows] == [("corpus-to-model", run["id"], "COMPLETED")]
        assert not list((tmp_path / "state" / "prefect").glob("*.db"))  # no SQLite beside it
        print(f"up --pool + one deployment run on PostgreSQL: {took:.0f} s")
