"""Early stopping on the val loss: where it stops, what it keeps, what it records, and resume."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from flows import report
from trainer.data import write_shard
from trainer.train import TrainConfig, train

VOCAB = 64
pytestmark = pytest.mark.usefixtures("one_thread")

# test_trainer's tiny setting: a repeating pattern to learn, and a val set with every 7th
# token noised, on which the model overfits: its growing confidence costs more on the
# noise than it gains, so the val loss turns up after the first checks
CFG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=40,
                  learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, log_every=5,
                  threads=1, seed=7, dtype="float32", checkpoint_every=5, keep_last=20, eval_tokens=512)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    stream = np.tile(np.random.default_rng(0).integers(0, VOCAB, size=24), 300).astype(np.uint16)
    write_shard(d / "train_0.bin", stream)
    noisy = stream[:2000].copy()
    noisy[::7] = np.random.default_rng(1).integers(0, VOCAB, size=len(noisy[::7]))
    write_shard(d / "val_0.bin", noisy)
    return [d / "train_0.bin"], [d / "val_0.bin"]


def run(shards, cfg, out, **kw):
    progress, lines = [], []
    stats = train(shards[0], VOCAB, cfg, out, log=lines.append, val_shards=shards[1],
                  on_progress=progress.append, **kw)
    return stats, progress, lines


def val_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"] + 1, r["val_loss"]) for r in records if "val_loss" in r]


def expected_stop(losses, patience, min_delta):
    """The rule, on a whole run's val losses: (stop step or None, best step)."""
    best, best_step, stale = None, None, 0
    for step, loss in losses:
        stale = 0 if best is None or loss < best - min_delta else stale + 1
        if best is None or loss < best:
            best, best_step = loss, step
        if stale >= patience:
            return step, best_step
    return None, best_step


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return out, *run(shards, CFG, out)  # patience 0: off


def test_patience_zero_runs_to_max_steps(whole):
    out, stats, progress, _ = whole
    assert stats["ended"] == "max_steps" and stats["steps"] == CFG.max_steps
    assert stats["early_stop"] is None
    assert progress[-1]["done"] == progress[-1]["total"] == CFG.max_steps and progress[-1]["eta_s"] == 0
    losses = val_losses(out)
    assert stats["best_step"] == min(losses, key=lambda r: r[1])[0]
    assert torch.load(out / "best.pt", weights_only=True)["step"] == stats["best_step"]
    assert not any("early stop" in line for line in report._train(stats))


def test_early_stopping_stops_on_the_plateau_and_keeps_the_best(whole, shards, tmp_path):
    whole_out, whole_stats, _, _ = whole
    cfg = replace(CFG, early_stop_patience=2)
    stop, best_step = expected_stop(val_losses(whole_out), 2, 0.0)
    assert stop is not None and stop < CFG.max_steps  # the val loss does turn up here
    stats, progress, lines = run(shards, cfg, tmp_path)

    assert stats["ended"] == "early_stop" and stats["steps"] == stop
    assert stats["best_step"] == best_step < stop
    assert stats["early_stop"] == {"patience": 2, "min_delta": 0.0, "checks_without_improvement": 2}
    # the same run as the whole one up to the stop: same val losses, then nothing more
    assert val_losses(tmp_path) == [r for r in val_losses(whole_out) if r[0] <= stop]
    assert stats["best_val_loss"] == dict(val_losses(whole_out))[best_step]
    # model.pt is best.pt: evaluate scores the best weights, and says which step they are from
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert best["step"] == model["step"] == best_step
    assert same_weights(best["model"], model["model"])
    assert not same_weights(model["model"], weights(tmp_path / "checkpoints" / f"step_{stop:07d}.pt"))
    assert (tmp_path / "loss.png").exists()
    assert any(line.startswith(f"early stop at step {stop}: 2 val checks") for line in lines)
    # the last progress report says the run is complete
    assert progress[-1]["done"] == progress[-1]["total"] == stop and progress[-1]["eta_s"] == 0
    line = report._ended(stats)
    assert line.startswith(f"- **stopped early** at step {stop} after 2 val checks") and f"step {best_step}" in line
    assert line in report._train(stats)
    assert report.KEY_FIGURES["train"](stats).startswith(f"{stop} steps (early stop), ")


def test_min_delta_asks_for_a_real_improvement(whole, shards, tmp_path):
    # a min_delta larger than any change: only the first check counts, so it stops at the
    # third (patience 2) while best.pt still follows the lowest val loss
    losses = val_losses(whole[0])
    stop, best_step = expected_stop(losses, 2, 100.0)
    assert stop == 3 * CFG.checkpoint_every
    stats, _, _ = run(shards, replace(CFG, early_stop_patience=2, min_delta=100.0), tmp_path)
    assert stats["ended"] == "early_stop" and stats["steps"] == stop
    assert stats["best_step"] == best_step and stats["best_val_loss"] == min(l for s, l in losses if s <= stop)


def test_patience_that_is_not_reached_runs_to_the_end(whole, shards, tmp_path):
    stats, _, _ = run(shards, replace(CFG, early_stop_patience=50), tmp_path)
    assert stats["ended"] == "max_steps" and stats["steps"] == CFG.max_steps
    assert same_weights(weights(tmp_path / "model.pt"), weights(whole[0] / "model.pt"))
    assert report._ended(stats) == ("- ran to max_steps: early stopping (50 val checks in a row without "
                                    "beating the best val loss by more than 0) did not fire")


def test_resume_keeps_the_counter(shards, tmp_path):
    # stops at step 15 (see above); killed at 10, one check without improvement is counted:
    # a resume that forgot it would run on to step 20
    cfg = replace(CFG, early_stop_patience=2, min_delta=100.0)
    straight, _, _ = run(shards, cfg, tmp_path / "straight")
    killed, _, _ = run(shards, cfg, tmp_path / "killed", stop_after=10)
    assert killed["ended"] == "stop_after" and killed["early_stop"]["checks_without_improvement"] == 1
    assert not (tmp_path / "killed" / "model.pt").exists()
    resumed, _, _ = run(shards, cfg, tmp_path / "killed", resume=True)
    assert resumed["ended"] == "early_stop" and resumed["steps"] == straight["steps"] == 15
    assert resumed["best_step"] == straight["best_step"]
    assert val_losses(tmp_path / "killed") == val_losses(tmp_path / "straight")
    assert same_weights(weights(tmp_path / "killed" / "model.pt"), weights(tmp_path / "straight" / "model.pt"))

    # killed after the stopping checkpoint, before model.pt: the resume trains nothing more
    (tmp_path / "straight" / "model.pt").unlink()
    again, _, lines = run(shards, cfg, tmp_path / "straight", resume=True)
    assert again["ended"] == "early_stop" and again["steps"] == 15
    assert any("nothing left to train" in line for line in lines)
    assert same_weights(weights(tmp_path / "straight" / "model.pt"), weights(tmp_path / "straight" / "best.pt"))


def test_early_stopping_needs_val_checks(shards, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every above 0"):
        TrainConfig(early_stop_patience=2, checkpoint_every=0)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TrainConfig(min_delta=-0.1)
    with pytest.raises(ValueError, match="no val shards"):
        train(shards[0], VOCAB, replace(CFG, early_stop_patience=2), tmp_path, log=lambda _: None)
