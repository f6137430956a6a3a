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
    """A list of memory-mapped shards: read in order for eval here, by `EpochLoader` for training.

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


class EpochLoader:
    """Training batches sampled without replacement, one epoch at a time.

    The token stream of each shard is cut into non-overlapping windows of block_size+1
    tokens starting at multiples of block_size (so consecutive windows share one token,
    the last target of one being the first input of the next), never crossing a shard.
    Each epoch visits every window once, in a permutation seeded by (seed, epoch). Under
    DDP, rank r of W takes windows r, r+W, r+2W, ... of that permutation, so ranks never
    see the same window; the permutation's tail that does not split evenly is skipped
    that epoch (it comes back in another order the next). A batch may span two epochs.

    The position (epoch, index into this rank's share) is all the state there is:
    `state_dict` / `load_state_dict` resume the exact sequence of batches.
    """

    def __init__(self, shards: Shards, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # a shard of n tokens holds (n - 1) // block_size windows of block_size+1 tokens
        per_shard = np.maximum(shards.lengths - 1, 0) // block_size
        self.window_ends = np.cumsum(per_shard)  # window i lives in the first shard whose end > i
        self.first_window = self.window_ends - per_shard  # id of each shard's window 0
        self.n_windows = int(self.window_ends[-1])
        self.per_rank = self.n_windows // world_size
        if self.per_rank == 0:
            raise ValueError(
                f"the shards ({', '.join(str(p) for p in shards.paths[:3])}"
                f"{', ...' if len(shards) > 3 else ''}) hold {self.n_windows} windows of "
                f"block_size+1 = {block_size + 1} tokens (longest shard has "
                f"{int(shards.lengths.max())} tokens), fewer than the {world_size} ranks need; "
                f"use a smaller block_size or more data")
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _rank_order(self) -> np.ndarray:
        """This rank's windows of the current epoch, in order (cached for the epoch)."""
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order = perm[self.rank:self.per_rank * self.world_size:self.world_size]
            self._order_epoch = self.epoch
        return self._order

    def next_windows(self) -> np.ndarray:
        """The global ids of the next batch_size windows; advances the position."""
        ids = []
        need = self.batch_size
        while need:
            take = self._rank_order()[self.index:self.index + need]
            ids.append(take)
            need -= len(take)
            self.index += len(take)
            if self.index == self.per_rank:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(ids)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch_size, block_size) int64 and y, x shifted left by one token."""
        ids = self.next_windows()
        shard_ids = np.searchsorted(self.window_ends, ids, side="right")
        starts = (ids - self.first_window[shard_ids]) * self.block_size
        buf = np.empty((len(ids), self.block_size + 1), dtype=np.int64)
        for row, (s, start) in enumerate(zip(shard_ids, starts)):
            buf[row] = self.shards.tokens[s][start:start + self.block_size + 1]
        buf = torch.from_numpy(buf)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n_windows": self.n_windows,
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("n_windows", "seed", "world_size"):
            if state[key] != mine[key]:
                raise ValueError(f"the saved data position was for {key}={state[key]}, but this run "
                                 f"has {key}={mine[key]}: resume with the same shards, block_size, "
                                 f"seed and number of processes, or start a fresh out_dir")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
