"""LoRA fine-tuning (Hu et al. 2021) of a trained GPT, with Hugging Face's peft.

The base model's weights stay frozen; each targeted Linear layer W gets a trainable
low-rank update (alpha / rank) * B @ A, B starting at zero so that training starts from
the base model exactly. peft does the layers, their state dict and the merge; our GPT
is a plain nn.Module, which peft adapts in place (its "custom models" path), so the
training loop, activation checkpointing and the chunked loss see the same GPT object.

Checkpoints during training hold the adapter only (kilobytes to a few MB, not the
model); the final model.pt holds the merged weights W + (alpha / rank) B @ A, a plain
GPT that evaluate, generate, serve and export load like any other.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

Target = Literal["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class LoraConfig:
    """LoRA fine-tuning of the train.init_from model: rank 0 = full fine-tuning (or none)."""
    rank: int = Field(0, ge=0, le=4096, description=(
        "rank of each adapter; 0 = off: all weights train"))
    alpha: float = Field(16.0, gt=0, le=1e6, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    # all of a block's Linear layers: adapting the MLP too is what brings LoRA close to full
    # fine-tuning (Dettmers et al. 2023, QLoRA); the tied embedding/head stays frozen
    targets: list[Target] = Field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], min_length=1,
        description="the Linear layers in each block that get an adapter")


def add_adapters(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Freeze `model` and give the targeted layers adapters, in place; returns peft's
    wrapper (for the adapter state and the merge), whose .base_model.model is `model`."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.targets), bias="none")
    return get_peft_model(model, peft_config)


def adapter_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only (what a LoRA checkpoint holds)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:  # another rank or targets than the model's adapters
        raise ValueError(f"the adapter checkpoint does not fit this model: unexpected "
                         f"{', '.join(result.unexpected_keys[:3])}")


def merged_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged into its layer's weight,
    leaving `peft_model` (still training) as it is."""
    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


def trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), shared tensors counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the weights themselves (names, shapes, values): an adapter checkpoint
    records its base's, so it is never merged into another model by mistake."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merged_model(checkpoint: dict, where: Path, base: Path | None = None) -> torch.nn.Module:
    """The GPT of an adapter-only checkpoint (at `where`): its base model (`base`, else the
    path the checkpoint records) with the adapters merged in."""
    from trainer.model import GPT, GPTConfig, load_model

    base = Path(base or checkpoint["base"]["path"])
    if not base.is_file():
        raise FileNotFoundError(
            f"{where} holds LoRA adapters only, and their base model {base} is not there: "
            f"use the run's model.pt (the merged model), or give the base model.pt the run was "
            f"fine-tuned from")
    parent, _ = load_model(base)
    if weights_digest(parent.state_dict()) != checkpoint["base"]["digest"]:
        raise ValueError(f"{base} is not the model the adapters in {where} were trained on "
                         f"(its weights differ): give the model.pt named by that run's train.init_from")
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(parent.state_dict())
    peft_model = add_adapters(model, LoraConfig(**checkpoint["lora"]))
    load_adapter_state(peft_model, checkpoint["adapter"])
    return peft_model.merge_and_unload()
