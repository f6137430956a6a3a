"""TensorBoard event files: the train loop's curves and evaluate's held-out curve and samples.

Written with torch.utils.tensorboard's SummaryWriter (the `tensorboard` package) into
tensorboard/train/ of the train artifact and tensorboard/evaluate/ of the evaluate
artifact: `c2m tensorboard` shows them as runs <train version>/train and /evaluate, side
by side with other versions'. A step is the train loop's step index, as in metrics.jsonl.
"""
from __future__ import annotations

from pathlib import Path

# at import, not in the train loop's timed window (~1 s: tensorboard and protobuf)
from torch.utils.tensorboard import SummaryWriter

FOLDER = "tensorboard"  # in the train and evaluate artifacts, a subfolder per run
# metrics.jsonl key -> TensorBoard tag
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu",
        "val_loss": "val/loss", "val_bits_per_byte": "val/bits_per_byte", "val_accuracy": "val/accuracy"}


class Board:
    """The scalars of metrics.jsonl records, as event files in out_dir/tensorboard/train;
    out_dir None writes nothing (the ranks other than 0).

    purge_step: where this run starts. A run resumed at step T after a kill at T+X hides
    what the killed run logged at steps >= T (SummaryWriter's purge_step: TensorBoard
    drops them when it reads this run's newer event file), so each step shows once, as
    metrics.jsonl has it.
    """

    def __init__(self, out_dir: Path | None, purge_step: int | None = None):
        self.writer = None
        if out_dir is not None:
            self.writer = SummaryWriter(str(out_dir / FOLDER / "train"), purge_step=purge_step)

    def add(self, record: dict) -> None:
        """A metrics.jsonl record's known scalars at its step, flushed: live in TensorBoard."""
        if self.writer is None:
            return
        for key, tag in TAGS.items():
            if record.get(key) is not None:  # mfu is None above the peak probe
                self.writer.add_scalar(tag, record[key], record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def samples_markdown(samples: list[dict]) -> str:
    """Generated texts for TensorBoard's text tab: each as a code block (four spaces in),
    so markdown does not reflow or reinterpret it."""
    blocks = []
    for i, sample in enumerate(samples, 1):
        body = "\n".join("    " + line for line in sample["text"].splitlines() or [""])
        blocks.append(f"**sample {i}**, prompt {sample['prompt']!r}:\n\n{body}")
    return "\n\n---\n\n".join(blocks)


def write_evaluation(out_dir: Path, metrics: dict) -> None:
    """Into out_dir/tensorboard/evaluate: evaluate's held-out curve (heldout/loss and
    heldout/bits_per_byte per checkpoint) and its samples (text, at the scored model's
    step). A checkpoint taken after N steps is at step N - 1, where the train run logged
    that checkpoint's val line: the points line up."""
    with SummaryWriter(str(out_dir / FOLDER / "evaluate")) as writer:
        for record in metrics.get("eval", {}).get("curve", []):
            step = max(record["step"] - 1, 0)
            writer.add_scalar("heldout/loss", record["loss"], step)
            # a masked LM's records have masked-token accuracy instead of bits per byte
            for key in ("bits_per_byte", "accuracy"):
                if key in record:
                    writer.add_scalar(f"heldout/{key}", record[key], step)
        if metrics.get("samples"):
            writer.add_text("samples", samples_markdown(metrics["samples"]),
                            max(metrics["checkpoint_step"] - 1, 0))
