"""Encode documents into fixed-size binary token shards, split train/val by document.

Each document is preceded by the end-of-text token, so documents are separated by it.
Shards use the llm.c layout (trainer.data owns the format); every shard but the last of
each split holds exactly `shard_tokens` tokens. Beside them, index.sqlite maps each
document id to its split, token offset and length, and each shard file to its token range
(corpus.index).
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from tokenizers import Tokenizer

from corpus.documents import is_val
from corpus.index import TokenIndexWriter
from corpus.tokenizer import EOT
from trainer.data import token_dtype, write_shard

ENCODE_BATCH_DOCS = 256
_STRICT = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


@dataclass(config=_STRICT)
class SplitConfig:
    """Train/val split by document id hash, the same in every stage."""
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents held out for validation")


@dataclass(config=_STRICT)
class ShardConfig:
    """Binary token shards in the llm.c layout."""
    shard_tokens: int = Field(10_000_000, ge=1024, le=2**31 - 1, description="tokens per shard file")


class _SplitWriter:
    """Buffers one split's tokens and writes a shard each time `shard_tokens` are full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.paths: list[Path] = []
        self.docs = self.tokens = self.bytes = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        self.docs += 1
        self.bytes += n_bytes
        self.tokens += len(ids)
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        while self.buffered >= self.shard_tokens:
            tokens = np.concatenate(self.buffer)
            self._write(tokens[: self.shard_tokens])
            rest = tokens[self.shard_tokens:]
            self.buffer, self.buffered = [rest], len(rest)

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, tokens)
        self.paths.append(path)

    def stats(self) -> dict:
        return {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes,
                "shards": [p.name for p in self.paths]}


def write_token_shards(docs: Iterable[tuple[str, str]], tokenizer: Tokenizer, out_dir: Path, *,
                       shard_tokens: int, val_fraction: float) -> dict:
    """`docs` streams (id, text). Returns per-split counts: docs, tokens, UTF-8 bytes, shards,
    and index_seconds, the time spent writing the index."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token; retrain it with the tokenizer stage")
    dtype = token_dtype(tokenizer.get_vocab_size())
    writers = {split: _SplitWriter(out_dir, split, shard_tokens, dtype) for split in ("train", "val")}
    index = TokenIndexWriter(out_dir)
    try:
        docs = iter(docs)
        while batch := list(islice(docs, ENCODE_BATCH_DOCS)):
            encodings = tokenizer.encode_batch([text for _, text in batch])
            for (id_, text), enc in zip(batch, encodings):
                split = "val" if is_val(id_, val_fraction) else "train"
                # the document's own tokens start after its end-of-text token
                index.document(id_, split, writers[split].tokens + 1, len(enc.ids))
                writers[split].add([eot, *enc.ids], len(text.encode("utf-8")))
        for split, w in writers.items():
            w.close()
            for k, path in enumerate(w.paths):  # every shard but the last is full
                index.shard(split, path.name, k * shard_tokens, min(shard_tokens, w.tokens - k * shard_tokens))
        index_seconds = index.close()
    except BaseException:
        index.abort()
        raise
    stats = {split: w.stats() for split, w in writers.items()}
    for split in ("train", "val"):
        if not stats[split]["tokens"]:
            raise ValueError(f"the {split} split is empty ({stats['train']['docs']} train, "
                             f"{stats['val']['docs']} val documents): use a larger corpus or "
                             f"change split.val_fraction ({val_fraction})")
    return {**stats, "index_seconds": round(index_seconds, 3)}


def write_document_tokens(docs: Iterable[tuple[str, str]], tokenizer: Tokenizer, out_dir: Path,
                          split: str) -> dict:
    """Every document of `docs` (id, text) into `<split>_NNNNNN.bin` shards of at most
    2**31 - 1 tokens, each preceded by the end-of-text token, streamed: the eval set.
    Returns docs, tokens, UTF-8 bytes, shards."""
    eot = tokenizer.token_to_id(EOT)
    writer = _SplitWriter(out_dir, split, 2**31 - 1, token_dtype(tokenizer.get_vocab_size()))
    docs = iter(docs)
    while batch := list(islice(docs, ENCODE_BATCH_DOCS)):
        for (_, text), enc in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
            writer.add([eot, *enc.ids], len(text.encode("utf-8")))
    writer.close()
    return writer.stats()
