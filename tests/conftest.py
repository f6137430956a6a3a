"""Shared fixtures: the shared real data, an isolated Prefect, a tiny realistic corpus."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
C2M = str(Path(sys.executable).with_name("c2m"))  # the console script of this venv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def missing_shared(*parts: str) -> str | None:
    """Why a test that reads ../shared/data/<parts> cannot run here, or None if it can.
    CI sets C2M_REQUIRE_SHARED=1: there the data must be present, never skipped."""
    path = SHARED_DATA.joinpath(*parts)
    if path.exists():
        return None
    why = f"needs {path}: ../shared/data is not beside this checkout (see its README)"
    if os.environ.get("C2M_REQUIRE_SHARED") == "1":
        pytest.fail(f"{why}; C2M_REQUIRE_SHARED=1 says it must be there")
    return why


def shared(*parts: str) -> Path:
    """The path of real test data in ../shared/data; the test is skipped, with the reason,
    in a plain clone that has no ../shared beside it."""
    why = missing_shared(*parts)
    if why:
        pytest.skip(why)
    return SHARED_DATA.joinpath(*parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A flow run in a process of its own, so that a test can kill it mid-stage or run two at
# once; it prints "RESULT <versions>" when it completes. With slow_train, training sleeps
# at each metrics line (same code version, same artifact version): time to kill it.
FLOW_IN_A_PROCESS = """
import json, sys, time
args = json.loads(sys.argv[1])
if args["slow_train"]:
    import trainer.train
    real = trainer.train.train
    def slow(*a, log=print, **kw):
        def slow_log(line):
            log(line)
            time.sleep(0.5)
        return real(*a, log=slow_log, **kw)
    trainer.train.train = slow
from flows.flow import corpus_to_model
versions = corpus_to_model(config="configs/demo.toml", overrides=args["overrides"], stages=args["stages"])
print("RESULT " + json.dumps(versions))
"""


def flow_argv(overrides: dict, stages: list[str] | None = None, slow_train: bool = False) -> list[str]:
    args = {"overrides": overrides, "stages": stages, "slow_train": slow_train}
    return [sys.executable, "-c", FLOW_IN_A_PROCESS, json.dumps(args)]


def flow_env(home: Path, **env: str) -> dict[str, str]:
    """This session's Prefect API, a PREFECT_HOME of the run's own, and `env` on top."""
    from prefect.settings import PREFECT_API_URL

    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(home),
            "PREFECT_SERVER_EPHEMERAL_ENABLED": "false", "PYTHONUNBUFFERED": "1", **env}


def start_flow(overrides: dict, home: Path, stages: list[str] | None = None, slow_train: bool = False,
               **env: str) -> subprocess.Popen:
    """Start the flow in a child process (flow_argv, flow_env), its output in home/log."""
    env = flow_env(home, **env)
    return subprocess.Popen(flow_argv(overrides, stages, slow_train), cwd=PROJECT, env=env,
                            stdout=open(home / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: a kill takes Dask and torchrun too


def finish_flow(proc: subprocess.Popen, home: Path, timeout: float = 300) -> tuple[dict, str]:
    """(versions, log) of a flow started by start_flow, which must complete in `timeout` s."""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (home / "log").read_text()
    assert proc.returncode == 0, log[-3000:]
    return json.loads(log.split("RESULT ", 1)[1].splitlines()[0]), log


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m flows.cli ARGS` from the project folder; `env` adds environment variables."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT, timeout=120, env={**os.environ, **env})


@pytest.fixture(autouse=True)
def environment_restored():
    """A test leaves os.environ as it found it, whatever it imported: flows.cli points
    PREFECT_API_URL at port 4200 when imported, which every later `c2m` child would inherit.
    Fixtures of wider scope (the Prefect harness, moto) are set up before this one."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One throwaway Prefect API for the whole session (~6 s to start)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


MOJIBAKE = "The cafÃ© served crÃ¨me brÃ»lÃ©e â€” and it was â€œperfectâ€\x9d."


def offensive_tweets(n: int) -> list[str]:
    with open(shared("toxicity-davidson", "labeled_data.csv"), newline="") as f:
        rows = [r["tweet"] for r in csv.DictReader(f) if r["class"] == "1"]
    return rows[:n]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder of HTML like a small crawl: 24 real WCXB pages, an exact and an edited
    copy of two of them, a page of mojibake, a page too short to keep, an offensive page."""
    root = tmp_path_factory.mktemp("tiny-corpus")
    pages = sorted(shared("wcxb-dev", "html").glob("*.html.gz"))[:24]
    for page in pages:
        shutil.copy(page, root / page.name)
    shutil.copy(pages[3], root / "copy-of-page-3.html.gz")  # same bytes, another URL
    html = gzip.decompress(pages[5].read_bytes()).replace(  # an edit inside the article
        b"Rocket Languages gets most things right.",
        b"Rocket Languages, this copy says, gets most things right.", 1)
    (root / "edited-copy-of-page-5.html.gz").write_bytes(gzip.compress(html))
    (root / "mojibake.html").write_text(
        "<html><body><article>" + "".join(f"<p>{MOJIBAKE} Paragraph {i} tells more.</p>"
                                          for i in range(12)) + "</article></body></html>")
    (root / "short.htm").write_text("<html><body><nav>Home | About</nav><p>Coming soon.</p></body></html>")
    tweets = "".join(f"<p>{t}</p>" for t in offensive_tweets(40))
    with gzip.open(root / "rant.html.gz", "wt") as f:
        f.write(f"<html><body><div>{tweets}</div></body></html>")
    return root


def tiny_overrides(corpus: Path, artifacts: Path) -> dict:
    """A config small enough that the whole flow runs in well under a minute."""
    return {
        "run.artifacts": str(artifacts),
        "dask.workers": 2,
        "dask.local_directory": str(artifacts.parent / "dask"),
        "source.kind": "path",
        "source.path": str(corpus),
        "source.docs_per_partition": 8,
        "filter.toxicity": "profanity-check",
        "filter.toxicity_threshold": 0.8,
        "split.val_fraction": 0.2,
        "tokenizer.vocab_size": 400,
        "shard.shard_tokens": 20000,
        "train.n_layer": 1,
        "train.n_head": 2,
        "train.n_embd": 32,
        "train.block_size": 32,
        "train.batch_size": 4,
        "train.max_steps": 6,
        "train.warmup_steps": 2,
        "train.log_every": 2,
        "train.dtype": "float32",
        "evaluate.max_tokens": 3000,
        "evaluate.samples": 1,
        "evaluate.sample_tokens": 8,
    }


@pytest.fixture(scope="module")
def one_thread():
    """For tiny models: they gain nothing from threads, and spinning OpenMP threads crawl
    when another process shares the cores (measured: 10x slower generation on 2 busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API on 127.0.0.1 for the session: moto's server mode, as s3fs's own tests
    use. Sets AWS_ENDPOINT_URL and test credentials in os.environ (botocore, so s3fs and
    every process started from here, reads them). Yields the endpoint URL."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto's S3 server did not start on {endpoint}: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_artifacts(s3_server, request) -> str:
    """A fresh bucket on the session's S3 server; returns `s3://<bucket>/artifacts`."""
    import re
    import uuid

    import boto3

    bucket = re.sub(r"[^a-z0-9-]", "-", f"t-{uuid.uuid4().hex[:8]}-{request.node.name.lower()}")[:63].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/artifacts"
