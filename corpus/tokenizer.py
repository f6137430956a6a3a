"""Byte-level BPE trained with `tokenizers` from a stream of documents."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


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
