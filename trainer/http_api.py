"""The HTTP API `c2m serve` runs: POST /generate (JSON, or streamed as NDJSON), GET /health, GET /model.

One model serves every request. The requests run in the server's thread pool and take
turns one forward pass at a time (a lock around each token's step), so concurrent
streams advance together, no two passes fight over the cores, and each request's
sampling has its own seeded generator and KV cache: its tokens are those it would get
alone.

A prompt longer than the model's context is refused (413) unless the request says
`truncate: true`; then its leftmost tokens are dropped and the answer says how many.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import socket
import threading
import warnings
from dataclasses import asdict
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from trainer.generate import EOT, stream_ids
from trainer.model import GPT

MAX_TOKENS = 1024  # per request: bounds the time one request holds its share of the model
log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    prompt: str = Field("", description="text to continue; empty: a new document")
    max_tokens: int = Field(100, ge=1, le=MAX_TOKENS, description="tokens to generate at most")
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="keep the k likeliest tokens; 0 = all")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus: the likeliest tokens up to this mass; 1 = all")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same text; none: a random one, "
                                                                 "returned in the answer")
    stream: bool = Field(False, description="NDJSON lines {\"text\"} as tokens come, then {\"done\": true, ...}")
    truncate: bool = Field(False, description="a prompt longer than the context: drop its leftmost "
                                              "tokens instead of refusing it (413)")


def quantize_int8(model: GPT) -> nn.Module:
    """The model with every nn.Linear (lm_head included) int8 dynamic-quantised, for the CPU:
    int8 weights, activations quantised per batch at run time. A copy; `model` is unchanged."""
    with warnings.catch_warnings():
        # torch >= 2.10 marks torch.ao.quantization and its quantized tensors deprecated in
        # favour of torchao (not installed; its int8 CPU path wants torch.compile); they
        # still ship and are what runs here: the warnings would only repeat that
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def text_pieces(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """The text each id adds, as the ids come, joining up to tokenizer.decode(all ids).

    A byte-level token can end inside a UTF-8 character, which decodes to U+FFFD until
    its last byte comes: trailing U+FFFDs wait for the next id (or the end)."""
    seen: list[int] = []
    sent = ""
    for id_ in ids:
        seen.append(id_)
        settled = tokenizer.decode(seen).rstrip("\ufffd")
        if len(settled) > len(sent):
            yield settled[len(sent):]
            sent = settled
    rest = tokenizer.decode(seen)[len(sent):]
    if rest:
        yield rest


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (0: any free port), or one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        hint = ("another process listens there: stop it or pick another --port"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RuntimeError(f"cannot listen on {host}:{port}: {reason}; {hint}") from exc


def create_app(model: nn.Module, tokenizer: Tokenizer, info: dict, int8: bool = False) -> FastAPI:
    """The API over `model` (in eval mode) and its tokenizer. `info` is what GET /model
    tells about where the model came from (version, sha256, lineage, train config)."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token: serve the model with the tokenizer it was trained with")
    config = model.config
    block_size = config.block_size
    version = info.get("version", "")
    step_lock = threading.Lock()
    api = FastAPI(title="corpus-to-model", summary=f"train/{version}")

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one readable line (field: problem) beside pydantic's list
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}",
                                                      "errors": jsonable_encoder(exc.errors())})

    def prompt_ids(req: GenerateRequest) -> tuple[list[int], int]:
        """<|endoftext|> + the prompt's ids (every training document starts after one),
        cut to the context when the request allows it; and how many ids were cut."""
        ids = [eot] + (tokenizer.encode(req.prompt).ids if req.prompt else [])
        over = len(ids) - block_size
        if over > 0 and not req.truncate:
            raise HTTPException(413, f"the prompt is {len(ids) - 1} tokens; this model reads at most "
                                     f"{block_size - 1} (block_size {block_size}, one for {EOT}): "
                                     "shorten it, or send \"truncate\": true to keep its last "
                                     f"{block_size} tokens")
        return ids[max(over, 0):], max(over, 0)

    def sampled(req: GenerateRequest, ids: list[int], seed: int) -> Iterator[int]:
        steps = stream_ids(model, ids, max_new_tokens=req.max_tokens, temperature=req.temperature,
                           top_k=req.top_k or None, top_p=req.top_p if req.top_p < 1 else None,
                           generator=torch.Generator().manual_seed(seed), stop_id=eot)
        while True:
            with step_lock:  # one forward pass at a time; requests take turns token by token
                next_id = next(steps, None)
            if next_id is None:
                return
            yield next_id

    def answer(req: GenerateRequest, new_ids: list[int], completion: str, seed: int, truncated: int,
               prompt_tokens: int) -> dict:
        return {"model": f"train/{version}", "prompt": req.prompt, "completion": completion,
                "finish_reason": "length" if len(new_ids) == req.max_tokens else "stop",
                "prompt_tokens": prompt_tokens, "completion_tokens": len(new_ids),
                "truncated_tokens": truncated, "seed": seed}

    @api.post("/generate")
    def generate(req: GenerateRequest):
        """Continue the prompt. The answer: completion (the new text only), finish_reason
        (stop: the model ended the document; length: max_tokens reached), token counts, and
        the seed (send it again for the same text). With stream: NDJSON, one {"text": piece}
        line per token that completes text, then the answer with "done": true."""
        ids, truncated = prompt_ids(req)
        seed = secrets.randbelow(2**63) if req.seed is None else req.seed
        n_prompt = len(ids) - 1 + truncated
        if not req.stream:
            new_ids = list(sampled(req, ids, seed))
            return answer(req, new_ids, tokenizer.decode(new_ids), seed, truncated, n_prompt)

        def lines() -> Iterator[str]:
            new_ids: list[int] = []

            def recorded() -> Iterator[int]:
                for id_ in sampled(req, ids, seed):
                    new_ids.append(id_)
                    yield id_
            try:
                for piece in text_pieces(tokenizer, recorded()):
                    yield json.dumps({"text": piece}) + "\n"
            except Exception as exc:  # the status line is sent: the error can only go in the stream
                log.exception("generation failed mid-stream")
                yield json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n"
                return
            # decoded whole, as without stream: a test checks that the pieces join up to it
            done = answer(req, new_ids, tokenizer.decode(new_ids), seed, truncated, n_prompt)
            yield json.dumps({"done": True, **done}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @api.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": f"train/{version}"}

    model_info = _json_safe({**info, "int8": int8, "model_config": asdict(config),
                             "limits": {"max_prompt_tokens": block_size - 1, "max_tokens": MAX_TOKENS}})

    @api.get("/model")
    def describe() -> dict:
        """The model's config, version, sha256, lineage (the stage versions it was built
        from) and the request limits."""
        return model_info

    return api


def _json_safe(value):
    """`value` with NaN and infinities as null: strict JSON has no such numbers, and a
    manifest may hold them (a loss that diverged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
