"""`c2m serve` and its HTTP API (trainer/http_api.py), with a real HTTP client (httpx) against
live servers: uvicorn in a thread over a tiny model, and `c2m serve --int8` as a user runs it."""
from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import torch.nn as nn
import uvicorn

from conftest import C2M, free_port
from corpus.tokenizer import EOT, train_bpe
from flows.store import ArtifactStore
from test_cli import environment
from test_generate_export import TEXTS, tiny_gpt
from test_store import commit
from trainer.evaluate import _bytes_to_unicode
from trainer.generate import generate_ids, generate_texts
from trainer.http_api import create_app, listen, quantize_int8, text_pieces

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 32
INFO = {"version": "v-test", "sha256": "ab" * 32,
        "lineage": [{"stage": "train", "version": "v-test"}, {"stage": "tokenizer", "version": "t1"}],
        # a diverged run's manifest: strict JSON has no NaN, /model must still answer
        "train": {"stats": {"final_loss": float("nan"), "losses": [1.5, float("inf")]}}}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def served(tokenizer):
    """The API over a tiny model, served by uvicorn in a thread on a free port."""
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size(), block_size=BLOCK)
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, INFO), log_level="warning"))
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
        yield SimpleNamespace(client=client, model=model, tokenizer=tokenizer)
    server.should_exit = True
    thread.join(timeout=10)


def post(served, **body) -> httpx.Response:
    return served.client.post("/generate", json=body)


def streamed(served, **body) -> list[dict]:
    with served.client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines() if line]


def answer(served, body: dict) -> dict:
    """The answer to `body`, streamed or not; a stream's pieces must join up to its completion."""
    if not body.get("stream"):
        r = post(served, **body)
        assert r.status_code == 200, r.text
        return r.json()
    *pieces, done = streamed(served, **body)
    assert done.pop("done") is True
    assert "".join(p["text"] for p in pieces) == done["completion"]
    return done


def test_health_and_model(served):
    assert served.client.get("/health").json() == {"status": "ok", "model": "train/v-test"}
    info = served.client.get("/model").json()
    assert info["version"] == "v-test" and info["sha256"] == INFO["sha256"]
    assert info["lineage"] == INFO["lineage"] and info["int8"] is False
    assert info["model_config"] == asdict(served.model.config)
    assert info["limits"] == {"max_prompt_tokens": BLOCK - 1, "max_tokens": 1024}
    assert info["train"]["stats"] == {"final_loss": None, "losses": [1.5, None]}


def test_generate_is_seeded_and_samples_as_c2m_generate(served):
    body = dict(prompt="The river", max_tokens=40, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = answer(served, body)
    assert answer(served, body) == first
    assert first["completion_tokens"] == 40 and first["finish_reason"] == "length"  # past block_size
    assert first["prompt_tokens"] == len(served.tokenizer.encode("The river").ids)
    assert first["truncated_tokens"] == 0 and first["seed"] == 7
    cli = generate_texts(served.model, served.tokenizer, ["The river"], n=1, max_new_tokens=40,
                         temperature=1.0, top_k=50, top_p=0.95, seed=7)
    assert "The river" + first["completion"] == cli[0]["text"]
    assert answer(served, {**body, "seed": 8})["completion"] != first["completion"]
    # no seed: a random one, returned, which gives the same text again
    unseeded = answer(served, dict(prompt="The river", max_tokens=20))
    assert answer(served, dict(prompt="The river", max_tokens=20, seed=unseeded["seed"])) == unseeded
    greedy = answer(served, dict(prompt="", max_tokens=10, temperature=0, seed=1))
    assert greedy["completion"] == answer(served, dict(prompt="", max_tokens=10, temperature=0, seed=2))["completion"]


def test_stream_yields_the_same_text_as_without(served):
    for seed in (1, 2, 3):
        body = dict(prompt="Numbers like \u2603", max_tokens=60, temperature=1.0, seed=seed)
        lines = streamed(served, **body)
        *pieces, done = lines
        assert done.pop("done") is True
        assert done == answer(served, body)
        assert "".join(p["text"] for p in pieces) == done["completion"]
        assert len(pieces) >= 5  # it came in pieces, not at the end


def test_text_pieces_wait_for_a_split_character(tokenizer):
    byte_token = {b: tokenizer.token_to_id(ch) for b, ch in _bytes_to_unicode().items()}
    ids = [byte_token[b] for b in "a\u2603b".encode()]  # the snowman's 3 bytes as 3 tokens
    assert list(text_pieces(tokenizer, ids)) == ["a", "\u2603", "b"]
    cut = ids[:3]  # ends inside the snowman: its bytes so far, decoded as decode() does
    assert "".join(text_pieces(tokenizer, cut)) == tokenizer.decode(cut) == "a\ufffd"


def test_concurrent_requests_get_what_they_would_alone(served):
    bodies = [dict(prompt=prompt, max_tokens=48, temperature=temperature, top_k=top_k, seed=seed,
                   stream=bool(seed % 2))
              for seed, (prompt, temperature, top_k) in enumerate(
                  [("The river", 1.0, 0), ("A small bird", 0.8, 20), ("", 1.2, 0), ("She wrote", 0.0, 0)] * 2)]
    alone = [answer(served, body) for body in bodies]
    assert len({a["completion"] for a in alone}) >= 7  # distinct requests: a mix-up would show
    barrier = threading.Barrier(len(bodies))

    def together(body):
        barrier.wait()
        return answer(served, body)
    for _ in range(2):
        with ThreadPoolExecutor(len(bodies)) as pool:
            assert list(pool.map(together, bodies)) == alone


@pytest.mark.parametrize("body, field, says", [
    ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({"max_tokens": 5000}, "max_tokens", "less than or equal to 1024"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": ["a"]}, "prompt", "valid string"),
    ({"max_token": 10}, "max_token", "Extra inputs are not permitted"),
])
def test_a_bad_request_gets_422_naming_the_field(served, body, field, says):
    r = post(served, **body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("invalid request: ") and f"{field}: " in detail and says in detail, detail


def test_a_body_that_is_not_json_gets_422(served):
    r = served.client.post("/generate", content=b"{prompt: 'x'", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]


def test_an_oversized_prompt_is_refused_unless_truncate(served):
    tokenizer, eot = served.tokenizer, served.tokenizer.token_to_id(EOT)
    words = " ".join(TEXTS).split()
    n_tokens = [len(tokenizer.encode(" ".join(words[:k])).ids) for k in range(1, 40)]
    k = next(k for k, n in enumerate(n_tokens, 1) if n > BLOCK - 1)  # the first prefix too long
    fits, too_long = " ".join(words[:k - 1]), " ".join(words[:k])
    assert answer(served, dict(prompt=fits, max_tokens=4, seed=1))["truncated_tokens"] == 0
    for stream in (False, True):
        r = post(served, prompt=too_long, max_tokens=4, seed=1, stream=stream)
        assert r.status_code == 413
        assert f"the prompt is {n_tokens[k - 1]} tokens; this model reads at most {BLOCK - 1}" in r.json()["detail"]
        assert '"truncate": true' in r.json()["detail"]

    long = " ".join(words[:60])
    ids = [eot] + tokenizer.encode(long).ids
    for stream in (False, True):
        got = answer(served, dict(prompt=long, max_tokens=20, temperature=1.0, seed=3, truncate=True, stream=stream))
        assert got["truncated_tokens"] == len(ids) - BLOCK and got["prompt_tokens"] == len(ids) - 1
        # the model read the prompt's last block_size tokens
        kept = generate_ids(served.model, ids[-BLOCK:], max_new_tokens=20, temperature=1.0, top_p=0.95,
                            generator=torch.Generator().manual_seed(3), stop_id=eot)
        assert got["completion"] == tokenizer.decode(kept)


def test_int8_replaces_every_linear_and_stays_close(tokenizer):
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size(), block_size=BLOCK, weight_std=0.05)
    quantized = quantize_int8(model)
    assert not [m for m in quantized.modules() if type(m) is nn.Linear]
    assert [m for m in model.modules() if type(m) is nn.Linear]  # the float model is untouched
    idx = torch.randint(0, tokenizer.get_vocab_size(), (4, BLOCK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model(idx)
        got, _ = quantized(idx)
    assert not torch.equal(got, want)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


# -- `c2m serve` as a user runs it: a model artifact in a store, a subprocess -------------

def model_store(root: Path, model, tokenizer) -> bytes:
    """tokenizer <- shard <- train, as the flow commits them; returns model.pt's bytes."""
    store = ArtifactStore(root)
    commit(store, "tokenizer", "tok0001", {"tokenizer.json": tokenizer.to_str().encode()})
    commit(store, "shard", "shard001", manifest={
        "inputs": {"tokenizer": {"stage": "tokenizer", "version": "tok0001"}}, "stats": {}})
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config)}, buffer)
    commit(store, "train", "train0001abc", {"model.pt": buffer.getvalue()}, manifest={
        "inputs": {"shard": {"stage": "shard", "version": "shard001"}},
        "config": {"train": {"max_steps": 3}}, "stats": {"val_loss": 5.25}})
    return buffer.getvalue()


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 60) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(pattern, path.read_text())
        if found:
            return found
        assert proc.poll() is None, f"c2m serve ended ({proc.returncode}):\n{path.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{path.read_text()}")


def test_c2m_serve_int8_then_port_in_use_then_ctrl_c(tmp_path, tokenizer):
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size(), block_size=BLOCK)
    weights = model_store(tmp_path / "artifacts", model, tokenizer)
    env = environment(tmp_path / "state", free_port())
    out = tmp_path / "serve.out"
    args = ["serve", "train00", "--root", str(tmp_path / "artifacts"), "--int8"]
    proc = subprocess.Popen([C2M, *args, "--port", "0"], env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT)
    try:
        url = wait_for_line(out, r"serving train/train0001abc \(int8\) on (http://127\.0\.0\.1:(\d+)) ", proc)
        with httpx.Client(base_url=url.group(1), timeout=30) as client:
            info = client.get("/model").json()
            assert info["int8"] is True and info["version"] == "train0001abc"
            assert info["sha256"] == hashlib.sha256(weights).hexdigest()
            assert info["lineage"] == [{"stage": "train", "version": "train0001abc"},
                                       {"stage": "shard", "version": "shard001"},
                                       {"stage": "tokenizer", "version": "tok0001"}]
            assert info["train"] == {"config": {"max_steps": 3}, "stats": {"val_loss": 5.25}}
            body = dict(prompt="The river", max_tokens=20, temperature=1.0, seed=5)
            first = client.post("/generate", json=body).json()
            assert first["completion_tokens"] > 0 and client.post("/generate", json=body).json() == first

        busy = subprocess.run([C2M, *args, "--port", url.group(2)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert busy.returncode == 1
        errors = [line for line in busy.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: cannot listen on 127.0.0.1:{url.group(2)}: Address already in use; "
                          "another process listens there: stop it or pick another --port"], busy.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
