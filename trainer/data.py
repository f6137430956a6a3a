"""Token shards: the on-disk format between the shard stage and training.

The format is llm.c's: a header of 256 little-endian int32 followed by the tokens.

    header[0] = 20240520  magic
    header[1] = 1 or 2    version: 1 = uint16 tokens, 2 = uint32 tokens
    header[2] = n         token count
    header[3:] = 0

Shards are memory-mapped and read a window at a time, so a corpus larger than RAM
trains just as well as a small one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
COUNT_CHUNK = 1 << 24  # tokens per bincount chunk: bounds memory for huge shards


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every token id below vocab_size."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` (uint16 or uint32, 1-D) as one shard file.

    Written to a temporary name and renamed, so a crash never leaves a shard that
    looks complete but is not.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype == np.uint16:
        version = 1
    elif tokens.dtype == np.uint32:
        version = 2
    else:
        raise TypeError(f"tokens must be uint16 or uint32 (see token_dtype), got {tokens.dtype}")
    if len(tokens) >= 2**31:
        raise ValueError(f"{len(tokens)} tokens do not fit the int32 count of one shard")

    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version, len(tokens)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(VERSION_DTYPES[version], copy=False).tobytes())
    os.replace(tmp, path)


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map the tokens of one shard (read-only), after checking its header."""
    path = Path(path)

    def bad(what: str) -> ValueError:
        return ValueError(f"bad token shard {path}: {what}; re-run the shard stage")

    if not path.is_file():
        raise bad("file does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise bad(f"file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise bad(f"magic is {header[0]}, expected {MAGIC}")
    version = int(header[1])
    if version not in VERSION_DTYPES:
        raise bad(f"version is {version}, expected one of {sorted(VERSION_DTYPES)}")
    count = int(header[2])
    if count < 0:
        raise bad(f"token count is negative ({count})")
    dtype = VERSION_DTYPES[version]
    expected = HEADER_BYTES + dtype.itemsize * count
    if size != expected:
        raise bad(f"file is {size} bytes but the header's {count} tokens of "
                  f"{dtype.itemsize} bytes need {expected}")
    if count == 0:
        # numpy cannot memory-map zero bytes; an empty read-only array behaves the same
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class Shards:
    """A list of shards read as windows: random ones for training, in-order ones for eval.

    A window never crosses a shard boundary; each shard is its own token stream.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no token shards given; re-run the shard stage")
        self.tokens = [open_shard(p) for p in self.paths]
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.n_tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.paths)

    def random_batch(self, batch_size: int, block_size: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows: x (B, T) int64 and y = x shifted left by one."""
        # A shard with n tokens has n - block_size window starts. Drawing one start
        # uniformly from all shards' starts picks each shard in proportion to its length,
        # and skips shards too short for a single window.
        starts = np.maximum(self.lengths - block_size, 0)
        total = int(starts.sum())
        if total == 0:
            raise ValueError(
                f"no shard holds a window of block_size+1 = {block_size + 1} tokens "
                f"(longest has {int(self.lengths.max())}); use a smaller block_size or more data")
        cum = np.cumsum(starts)
        picks = torch.randint(0, total, (batch_size,), generator=generator).numpy()
        shard_ids = np.searchsorted(cum, picks, side="right")
        offsets = picks - (cum[shard_ids] - starts[shard_ids])

        buf = np.empty((batch_size, block_size + 1), dtype=np.int64)
        for row, (s, o) in enumerate(zip(shard_ids, offsets)):
            buf[row] = self.tokens[s][o:o + block_size + 1]
        buf = torch.from_numpy(buf)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def sequential_windows(self, block_size: int, max_tokens: int | None = None
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows over all shards in order: (x, y), each (block_size,) int64.

        Window i of a shard is x = tokens[i*T : (i+1)*T], y = tokens[i*T+1 : (i+1)*T+1].
        The tail of a shard too short for another full window is left out. Stops before
        the number of targets yielded would exceed `max_tokens`.
        """
        yielded = 0
        for tokens in self.tokens:
            for start in range(0, len(tokens) - block_size, block_size):
                if max_tokens is not None and yielded + block_size > max_tokens:
                    return
                window = torch.from_numpy(tokens[start:start + block_size + 1].astype(np.int64))
                yielded += block_size
                yield window[:-1], window[1:]

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs across all shards, shape (vocab_size,) int64."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for path, tokens in zip(self.paths, self.tokens):
            for start in range(0, len(tokens), COUNT_CHUNK):
                chunk = np.bincount(tokens[start:start + COUNT_CHUNK], minlength=vocab_size)
                if len(chunk) > vocab_size:
                    raise ValueError(f"{path} holds token id {len(chunk) - 1}, "
                                     f"not below vocab_size {vocab_size}")
                counts += chunk
        return counts
