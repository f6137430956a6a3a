"""A GPT-2 style decoder-only transformer, small enough to read at one sitting; with
`causal=False` the same blocks make a bidirectional encoder for masked-LM training."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, each (B, n_head, T, head_size)


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest context the model sees
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as in GPT-2
    # False: a bidirectional encoder for masked LM (trainer.masked): no causal mask, BERT's
    # MLM head (dense, GELU, LayerNorm, an output bias) before the tied output embedding,
    # and its last token id is [MASK]. Checkpoints from before this field are causal.
    causal: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.causal = config.causal
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """x (B, T, C) -> (output, this layer's keys and values including `past`'s)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): heads attend independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask = None
        if past is not None:  # generation: x follows the cached positions, which it may all see
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
        if x.device.type == "cpu":
            # On the CPU attention runs in float32 even under bf16 autocast: torch's CPU bf16
            # attention backward is slow at small head sizes. Measured, tokens/s of whole bf16
            # steps on 2 cores, float32 -> bf16 attention: head size 64 (4x256 model) eager
            # 9,500 -> 10,000, compiled 10,200 -> 10,800, but head size 32 (4x128 demo model)
            # eager 14,200 -> 12,000, compiled 18,600 -> 13,900.
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), mask)
        else:  # on GPUs in the autocast dtype, so the fused (flash) kernels run
            y = self._attend(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                              dropout_p=self.dropout if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: normalise the input of each sublayer, keep the residual path clean."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        attn_out, kv = self.attn(self.ln1(x), past)
        x = x + attn_out
        return x + self.mlp(self.ln2(x)), kv


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tie input and output embeddings: fewer parameters, and it trains better.
        self.lm_head.weight = self.wte.weight
        if not config.causal:  # BERT's MLM head: what MegatronBertForMaskedLM has (trainer.export)
            self.mlm_dense = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.mlm_ln = nn.LayerNorm(config.n_embd, bias=config.bias)
            self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        # set by the trainer, not part of the model's shape: in training, keep only each
        # block's input and recompute its inside during backward (less memory, more compute)
        self.activation_checkpointing = False

        self.apply(self._init_weights)
        # GPT-2: each block adds two projections into the residual stream, so shrink
        # their init to keep the stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), None); with targets (B, T), -> (None,
        mean cross-entropy). On the CPU a loss is computed without ever building the logits (see
        chunked_cross_entropy: that is most of a CPU training step's head), so a caller that
        wants both calls model(idx) and takes the loss of those logits itself.
        positions (B, K): score only those positions, targets (B, K) being their tokens (masked
        LM: the loss is on the masked positions alone, and only they go through the head)."""
        h, _ = self.hidden_states(idx)
        if targets is None:
            return self.head(h), None
        if positions is not None:
            h = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        if not self.config.causal:
            h = self.mlm_transform(h)
        bias = None if self.config.causal else self.mlm_bias
        if h.device.type != "cpu":
            # GPUs have the bandwidth for the full logits, and one large matmul keeps them
            # busier than many chunks (the chunked path was measured on CPUs only)
            logits = F.linear(h, self.lm_head.weight, bias).float()
            return None, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return None, chunked_cross_entropy(h, self.lm_head.weight, targets, bias=bias)

    def mlm_transform(self, h: torch.Tensor) -> torch.Tensor:
        """An encoder's final states -> what its output embedding scores (BERT's transform)."""
        return self.mlm_ln(F.gelu(self.mlm_dense(h)))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final states (..., n_embd) -> logits (..., vocab)."""
        if self.config.causal:
            return self.lm_head(h)
        return F.linear(self.mlm_transform(h), self.lm_head.weight, self.mlm_bias)

    def forward_cached(self, idx: torch.Tensor, cache: list[KV] | None = None
                       ) -> tuple[torch.Tensor, list[KV]]:
        """Logits of idx (B, T) placed after the positions in `cache` (per layer keys and
        values, from an earlier call), and the cache extended by idx: generation feeds
        the prompt once, then one token per call instead of the whole context."""
        if not self.config.causal:
            raise ValueError("this model is a bidirectional encoder (masked LM): it fills in "
                             "[MASK] tokens and does not generate text")
        h, new_cache = self.hidden_states(idx, cache)
        return self.lm_head(h), new_cache

    def hidden_states(self, idx: torch.Tensor, cache: list[KV] | None = None
                      ) -> tuple[torch.Tensor, list[KV]]:
        """The final layer-normed states (B, T, n_embd) that lm_head turns into logits, and
        the extended cache (see forward_cached)."""
        B, T = idx.shape
        start = 0 if cache is None else cache[0][0].size(2)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        new_cache = []
        if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            # use_reentrant=False: the recommended variant; it restores the RNG state, so the
            # recomputed dropout masks are the forward's. No cache: its keys and values would
            # keep alive what checkpointing frees.
            for block in self.blocks:
                x = checkpoint(_block_output, block, x, use_reentrant=False)
            return self.ln_f(x), new_cache
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.ln_f(x), new_cache


def _block_output(block: Block, x: torch.Tensor) -> torch.Tensor:
    return block(x)[0]


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 256, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T + bias (h (..., C), weight (vocab, C),
    bias (vocab,) or None) against targets (...), as F.cross_entropy(F.linear(h, weight,
    bias).float(), targets) computes it, in the autocast dtype when autocast is on (matmuls
    in it, log-softmax in float32)."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    # which gradients to make: a frozen head (LoRA) skips its weight's, a third of the work
    need_grad = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (h, weight, bias))
    return _ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1),
                                           dtype, chunk, need_grad, bias)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """lm_head and the loss together, `chunk` rows of logits at a time (Liger-Kernel's fused
    linear cross-entropy). Why: on a CPU, the head's time goes less to its matmuls than to
    memory-bound float32 passes over the whole (B*T, vocab) logits: the upcast copy,
    log-softmax forward and backward, the zeroed gradient buffer (profiled: a third of a
    bf16 step of the 4x256 model at vocab 8192). A chunk of logits stays in cache, and its
    gradient d loss / d logits = (softmax - one_hot(target)) / N is made on the spot and
    turned into the gradients of h and weight, so backward has only to scale them.
    Measured on 2 cores, whole training steps, tokens/s: 4x256 model bf16 eager 7,100 ->
    9,500, compiled 9,200 -> 10,200, float32 4,700 -> 5,300; 4x128 demo model bf16 eager
    9,400 -> 14,200, compiled 13,400 -> 18,600."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk, need_grad, bias):
        h_, weight_ = h.to(dtype), weight.to(dtype)
        bias_ = None if bias is None else bias.to(dtype)
        exact = torch.promote_types(dtype, torch.float32)  # log-softmax and sums: float32 or better
        grad_h = torch.empty_like(h_) if need_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if need_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=exact) if need_grad[2] else None
        loss_sum = torch.zeros((), dtype=exact, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen here
            for start in range(0, h.size(0), chunk):
                h_chunk, t_chunk = h_[start:start + chunk], targets[start:start + chunk]
                logits = h_chunk @ weight_.t() if bias_ is None else torch.addmm(bias_, h_chunk, weight_.t())
                logprobs = torch.log_softmax(logits, dim=-1, dtype=exact)
                loss_sum -= logprobs.gather(1, t_chunk[:, None]).sum()
                if any(need_grad):
                    # softmax - one_hot, in the matmul dtype (the exp writes it directly)
                    grad_logits = torch.exp(logprobs, out=torch.empty_like(logprobs, dtype=dtype))
                    grad_logits[torch.arange(len(t_chunk), device=h.device), t_chunk] -= 1
                    if grad_h is not None:
                        torch.mm(grad_logits, weight_, out=grad_h[start:start + chunk])
                    if grad_weight is not None:
                        grad_weight += grad_logits.t() @ h_chunk  # summed in `exact`
                    if grad_bias is not None:
                        grad_bias += grad_logits.sum(0, dtype=exact)
        ctx.save_for_backward(grad_h, grad_weight, grad_bias)
        ctx.n_rows, ctx.dtypes = h.size(0), (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss_sum / h.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight, grad_bias = ctx.saved_tensors  # None where need_grad said so
        scale = grad_loss / ctx.n_rows  # applied after the cast: a float16 GradScaler's is large
        return (None if grad_h is None else grad_h.to(ctx.dtypes[0]) * scale,
                None if grad_weight is None else (grad_weight * scale).to(ctx.dtypes[1]),
                None, None, None, None, None if grad_bias is None else (grad_bias * scale).to(ctx.dtypes[2]))


def load_model(path: Path | str, device: str | torch.device = "cpu",
               base: Path | None = None) -> tuple[GPT, dict]:
    """Rebuild the model saved by `train` (in eval mode, on `device`) and return it with the
    checkpoint. A LoRA run's checkpoints hold adapters only: they are merged into their base
    model (`base`, else the path they record; see trainer.lora)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train a model first (it writes model.pt)")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}); "
                         "point at the model.pt that training wrote") from e
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint \
            or not checkpoint.keys() & {"model", "adapter"}:
        raise ValueError(f"{path} is not a trainer checkpoint (a dict with 'model' and 'model_config'); "
                         "point at the model.pt that training wrote")
    if "model" in checkpoint:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    else:
        from trainer.lora import merged_model

        model = merged_model(checkpoint, path, base)
    model.to(device).eval()
    return model, checkpoint
