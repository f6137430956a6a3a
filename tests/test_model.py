"""The model's training loss: chunked_cross_entropy against the plain logits -> F.cross_entropy path."""
import pytest
import torch
import torch.nn.functional as F

from trainer.model import GPT, GPTConfig, chunked_cross_entropy

VOCAB = 97  # odd, so no chunk or vector width divides it
CONFIG = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0, B=3, T=13):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g))


def plain_loss(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_gradcheck_with_a_chunk_that_does_not_divide_the_rows():
    torch.manual_seed(0)
    h = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)  # 26 rows, chunks of 7
    weight = torch.randn(VOCAB, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 13))
    loss = chunked_cross_entropy(h, weight, targets, chunk=7)
    plain = F.cross_entropy((h @ weight.T).view(-1, VOCAB), targets.view(-1))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, targets, chunk=7), (h, weight))


def test_a_frozen_head_gets_no_gradient_and_the_states_the_same_one():
    """LoRA freezes the tied embedding/head: its gradient is not made at all."""
    torch.manual_seed(0)
    h = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 8, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (2, 13))
    (grad_h,) = torch.autograd.grad(chunked_cross_entropy(h, weight, targets, chunk=7), h)
    trainable = weight.clone().requires_grad_()
    expected, grad_weight = torch.autograd.grad(chunked_cross_entropy(h, trainable, targets, chunk=7),
                                                (h, trainable))
    torch.testing.assert_close(grad_h, expected, rtol=0, atol=0)
    assert grad_weight.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda h: chunked_cross_entropy(h, weight, targets, chunk=7), (h,))


@pytest.mark.parametrize("chunk", [1, 5, 39, 1000])  # 39 rows: one row, uneven, exact, all in one
def test_float32_matches_the_plain_path_at_any_chunk_size(chunk):
    torch.manual_seed(0)
    h = torch.randn(39, 32, requires_grad=True)
    weight = (0.5 * torch.randn(VOCAB, 32)).requires_grad_()
    targets = torch.randint(0, VOCAB, (39,))
    ours = chunked_cross_entropy(h, weight, targets, chunk=chunk)
    ours_grads = torch.autograd.grad(2.5 * ours, (h, weight))  # an upstream gradient other than 1
    plain = F.cross_entropy(h @ weight.T, targets)
    plain_grads = torch.autograd.grad(2.5 * plain, (h, weight))
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, b in zip(ours_grads, plain_grads):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < 1e-5


def test_model_loss_and_every_gradient_match_the_plain_path_in_float32():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x, y = batch()
    logits, loss = model(x, y)
    assert logits is None and loss.ndim == 0  # with targets the logits are never built
    logits, none = model(x)
    assert logits.shape == (3, 13, VOCAB) and none is None
    ours_loss, ours = loss_and_grads(model, lambda: model(x, y)[1])
    plain_loss_value, plain = loss_and_grads(model, lambda: plain_loss(model, x, y))
    assert ours_loss == pytest.approx(plain_loss_value, rel=1e-6)
    assert ours.keys() == plain.keys()
    for name in plain:
        assert rel_err(ours[name], plain[name]) < 1e-5, name


def test_tied_weight_gets_the_gradient_of_both_embedding_and_head():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    assert model.lm_head.weight is model.wte.weight
    x, y = batch(B=1, T=8)  # 8 input ids: most rows of wte are used by the head only
    _, total = loss_and_grads(model, lambda: model(x, y)[1])
    head_only = torch.autograd.grad(
        chunked_cross_entropy(model.hidden_states(x)[0].detach(), model.wte.weight, y), model.wte.weight)[0]
    embedding_only = total["wte.weight"] - head_only
    in_x = torch.zeros(VOCAB, dtype=torch.bool)
    in_x[x.view(-1)] = True
    assert (head_only.abs().sum(1) > 0).all()  # the softmax touches every row of the head
    assert (embedding_only[in_x].abs().sum(1) > 0).all()
    assert embedding_only[~in_x].abs().max() < 1e-7


def test_bf16_autocast_is_as_close_to_float32_as_the_plain_path_is():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x, y = batch()
    exact_loss, exact = loss_and_grads(model, lambda: plain_loss(model, x, y))  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_loss, ours = loss_and_grads(model, lambda: model(x, y)[1])
        plain_loss_value, plain = loss_and_grads(model, lambda: plain_loss(model, x, y))
    assert ours_loss == pytest.approx(exact_loss, rel=1e-2)
    assert abs(ours_loss - exact_loss) <= 2 * abs(plain_loss_value - exact_loss) + 1e-3
    for name in exact:
        assert ours[name].dtype == torch.float32
        # bf16 rounding: within a few bf16 ulps (2^-8) of float32, like the plain path
        assert rel_err(ours[name], exact[name]) < 0.03, name
        assert rel_err(ours[name], exact[name]) <= 2 * rel_err(plain[name], exact[name]) + 1e-3, name


def test_no_grad_gives_the_same_loss_and_nothing_to_backpropagate():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x, y = batch()
    with torch.no_grad():
        _, loss = model(x, y)
        plain = plain_loss(model, x, y)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_compiled_model_trains_like_the_eager_one():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x, y = batch()
    compiled = torch.compile(model, backend="eager")  # dynamo tracing, no code generation
    eager_loss, eager = loss_and_grads(model, lambda: model(x, y)[1])
    compiled_loss, grads = loss_and_grads(model, lambda: compiled(x, y)[1])
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    for name in eager:
        assert rel_err(grads[name], eager[name]) < 1e-6, name
