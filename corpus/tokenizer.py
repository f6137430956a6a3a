"""Byte-level BPE trained with `tokenizers` from a stream of documents."""
from __future__ import annotations

from typing import Iterable

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
BASE_VOCAB = 256 + 1  # every byte, and EOT: what a BPE vocabulary holds before any merge


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class TokenizerConfig:
    """Byte-level BPE, trained on the train split of the deduplicated documents."""
    vocab_size: int = Field(8192, ge=BASE_VOCAB + 1, le=2**20, description=(
        "tokens, the 256 bytes and <|endoftext|> included (shards are uint16 up to 65,536)"))
    min_frequency: int = Field(2, ge=1, description="a merge needs pairs seen at least this often")


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """`texts` is consumed once, as a stream; the corpus is never held in memory."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        # every byte is in the vocabulary, so any text encodes without unknown tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str], batch: int = 256) -> dict:
    """Compression on held-out text: UTF-8 bytes per token (higher is better)."""
    n_bytes = n_tokens = n_docs = 0
    chunk: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(e.ids) for e in tokenizer.encode_batch(chunk))
        chunk.clear()

    for text in texts:
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        chunk.append(text)
        if len(chunk) == batch:
            flush()
    flush()
    return {"docs": n_docs, "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None}
