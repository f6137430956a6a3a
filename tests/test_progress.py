"""Live progress: train's on_progress, the Prefect progress artifact, map_partitions'
count, the terminal line of a real `c2m run`, and a fast `c2m --help`."""
from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import C2M, free_port, tiny_overrides
from test_cli import environment

PATTERN = np.arange(16, dtype=np.uint16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from trainer.data import write_shard

    d = tmp_path_factory.mktemp("shards")
    write_shard(d / "train_0.bin", np.tile(PATTERN, 200))
    return [d / "train_0.bin"]


def tiny_train_config(**changes):
    from trainer.train import TrainConfig

    return TrainConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 4,
                          "max_steps": 12, "warmup_steps": 2, "log_every": 3, "threads": 1,
                          "dtype": "float32", "checkpoint_every": 0, **changes})


def test_train_reports_progress_and_final_loss_leaves_out_step_0(shards, tmp_path):
    from trainer.train import train

    reports = []
    stats = train(shards, 16, tiny_train_config(), tmp_path, log=lambda _: None, on_progress=reports.append)
    done = [r["done"] for r in reports]
    assert done == [1, 4, 7, 10, 12]  # after steps 0, 3, 6, 9 (log_every 3), then the end
    assert all(r["total"] == 12 and r["unit"] == "step" for r in reports)
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in reports)
    elapsed = [r["elapsed_s"] for r in reports]
    assert elapsed == sorted(elapsed) and all(r["eta_s"] > 0 for r in reports[:-1])
    assert reports[-1]["eta_s"] == 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert stats["initial_loss"] == losses[0]
    later = [loss for step, loss in losses.items() if step > 0]
    assert stats["final_loss"] == pytest.approx(sum(later) / len(later))  # 4 lines after step 0


def test_progress_reports_are_throttled_but_the_last_goes_out(monkeypatch):
    from flows.progress import StageProgress

    sent = []
    progress = StageProgress("train", min_interval=60)
    monkeypatch.setattr(progress, "_publish", lambda pct, text: sent.append((pct, text)))
    for done in range(1, 51):
        progress({"unit": "step", "done": done, "total": 50, "loss": 2.0, "tokens_per_s": 1000.0,
                  "elapsed_s": done, "eta_s": 50 - done})
    assert [pct for pct, _ in sent] == [2.0, 100.0]
    assert sent[-1][1] == "train: step 50/50 · loss 2.000 · 1,000 tok/s · ETA 0.0 s"


def test_the_progress_artifact_reaches_100_and_the_watcher_shows_it(prefect_harness, shards, tmp_path):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.progress import StageProgress, TerminalLine, watch_flow_run
    from trainer.train import train

    @task(name="train")
    def train_task():
        train(shards, 16, tiny_train_config(), tmp_path, log=lambda _: None,
              on_progress=StageProgress("train", min_interval=0))

    @flow(name="progress-test")
    def progress_flow():
        train_task()

    flow_run_id = progress_flow(return_state=True).state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        assert [(a.key, a.type) for a in found] == [("train-progress", "progress")]  # one, updated
        assert found[0].data == 100
        assert found[0].description.startswith("train: step 12/12 · loss ") and "ETA 0.0 s" in found[0].description

        out = io.StringIO()  # not a terminal: plain lines
        final = watch_flow_run(client, flow_run_id, TerminalLine(out), poll_s=0.1)
    assert final.state.is_completed()
    assert out.getvalue() == found[0].description + "\n"


def slow_first(i: int) -> int:
    time.sleep(1.0 if i == 0 else 0.05)  # finishes last: results must still come in item order
    return i * i


def test_map_partitions_counts_partitions_and_shows_the_dashboard(tmp_path, capsys):
    from flows import parallel

    cfg = parallel.DaskConfig(workers=2, local_directory=str(tmp_path / "dask"))
    reports = []
    try:
        results = parallel.map_partitions(cfg, slow_first, range(6), on_progress=reports.append)
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("Dask dashboard: http://")
        with urllib.request.urlopen(line.removeprefix("Dask dashboard: "), timeout=10) as page:
            assert page.status == 200
    finally:
        parallel.shutdown()
    assert results == [i * i for i in range(6)]
    assert [r["done"] for r in reports] == [1, 2, 3, 4, 5, 6]
    assert all(r["total"] == 6 and r["unit"] == "partition" for r in reports)


def test_c2m_run_prints_each_stage_progress_line(tiny_corpus, tmp_path):
    env = environment(tmp_path / "state", free_port())
    sets = [arg for key, value in tiny_overrides(tiny_corpus, tmp_path / "artifacts").items()
            for arg in ("--set", f"{key}={value}")]
    result = subprocess.run([C2M, "run", *sets], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    train_lines = [line for line in lines if line.startswith("train: step ")]
    # not a terminal: a line each time a stage passes another 10%, the last at 6/6
    assert train_lines[-1].startswith("train: step 6/6 · loss ") and train_lines[-1].endswith("ETA 0.0 s")
    assert len(train_lines) == len(set(train_lines)) >= 3
    assert set(json.loads(result.stdout)) >= {"extract", "train", "evaluate"}
    for stage in ("extract", "normalize", "filter", "dedup"):
        counts = [re.match(rf"{stage}: partition (\d+)/(\d+)$", line) for line in lines]
        counts = [m.groups() for m in counts if m]
        assert counts and counts[-1][0] == counts[-1][1], (stage, result.stderr)


def test_help_is_fast_and_imports_neither_torch_nor_prefect():
    started = time.time()
    result = subprocess.run([C2M, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage: c2m" in result.stdout
    assert time.time() - started < 2.0
    code = ("import sys; sys.argv = ['c2m', '--help']\nfrom flows import cli\n"
            "try:\n    cli._main()\nfinally:\n"
            "    print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'prefect', 'dask'}))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert found.stdout.strip().splitlines()[-1] == "[]", found.stdout + found.stderr
