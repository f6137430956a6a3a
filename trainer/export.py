"""A trained checkpoint as a Hugging Face GPT-2 folder, loadable with
AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained; a masked LM
(GPTConfig(causal=False)) as a MegatronBertForMaskedLM folder, for AutoModelForMaskedLM.

Our model is GPT-2's architecture, so only parameter names and layouts change.
transformers itself writes the folder, so it is exactly what transformers reads.

Why Megatron-BERT for the encoder, not BertForMaskedLM: our blocks are pre-LayerNorm
(x + f(LN(x)), a final LayerNorm after the last block), BERT's are post-LayerNorm
(LN(x + f(x)), a LayerNorm on the embeddings): no choice of weights makes one compute
the other. MegatronBertForMaskedLM is BERT's masked-LM model with exactly our layout:
no embedding LayerNorm, a LayerNorm before attention and before the MLP in each layer,
a final one, then BERT's MLM head (dense, GELU, LayerNorm, tied decoder with a bias),
which our encoder has for that reason. Its token-type embeddings are set to zero.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer

from trainer.generate import EOT
from trainer.masked import MASK, with_mask_token
from trainer.model import GPT, load_model


# our parameter name -> GPT-2's, per block (under transformer.h.{i}.)
BLOCK_NAMES = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "ln2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """model's weights named and laid out as GPT2LMHeadModel's."""
    config, ours = model.config, model.state_dict()

    def layer_norm(src: str, dst: str) -> dict[str, torch.Tensor]:
        weight = ours[f"{src}.weight"]
        # bias=False models: GPT-2 always has LayerNorm biases, zero ones change nothing
        return {f"{dst}.weight": weight, f"{dst}.bias": ours.get(f"{src}.bias", torch.zeros_like(weight))}

    def linear(src: str, dst: str) -> dict[str, torch.Tensor]:
        weight = ours[f"{src}.weight"]
        # GPT-2's Conv1D computes x @ W, nn.Linear x @ W.T: same numbers, transposed
        return {f"{dst}.weight": weight.t().contiguous(),
                f"{dst}.bias": ours.get(f"{src}.bias", weight.new_zeros(weight.size(0)))}

    out = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"],
           "lm_head.weight": ours["wte.weight"]}  # tied, as in our model
    out.update(layer_norm("ln_f", "transformer.ln_f"))
    for i in range(config.n_layer):
        for src, dst in BLOCK_NAMES.items():
            convert = layer_norm if src.startswith("ln") else linear
            out.update(convert(f"blocks.{i}.{src}", f"transformer.h.{i}.{dst}"))
    return out


def megatron_bert_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """An encoder's weights named and laid out as MegatronBertForMaskedLM's (type_vocab_size 2,
    token-type embeddings zero). nn.Linear on both sides: no transposes; our fused qkv
    splits into query, key and value by rows, in that order, heads in the same order."""
    config, ours = model.config, model.state_dict()

    def copy(src: str, dst: str) -> dict[str, torch.Tensor]:
        weight = ours[f"{src}.weight"]
        # bias=False models: zero biases change nothing
        return {f"{dst}.weight": weight, f"{dst}.bias": ours.get(f"{src}.bias", weight.new_zeros(weight.size(0)))}

    wte = ours["wte.weight"]
    out = {"bert.embeddings.word_embeddings.weight": wte,
           "bert.embeddings.position_embeddings.weight": ours["wpe.weight"],
           "bert.embeddings.token_type_embeddings.weight": wte.new_zeros(2, config.n_embd),
           "cls.predictions.decoder.weight": wte,  # tied, as in our model
           "cls.predictions.decoder.bias": ours["mlm_bias"], "cls.predictions.bias": ours["mlm_bias"]}
    out.update(copy("ln_f", "bert.encoder.ln"))
    out.update(copy("mlm_dense", "cls.predictions.transform.dense"))
    out.update(copy("mlm_ln", "cls.predictions.transform.LayerNorm"))
    for i in range(config.n_layer):
        ours_, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        qkv = copy(ours_ + "attn.qkv", "qkv")
        for part, weight, bias in zip(("query", "key", "value"), qkv["qkv.weight"].chunk(3),
                                      qkv["qkv.bias"].chunk(3)):
            out[f"{theirs}attention.self.{part}.weight"] = weight
            out[f"{theirs}attention.self.{part}.bias"] = bias
        for src, dst in (("ln1", "attention.ln"), ("attn.proj", "attention.output.dense"), ("ln2", "ln"),
                         ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense")):
            out.update(copy(ours_ + src, theirs + dst))
    return out


def _gpt2(model: GPT, tokenizer: Tokenizer, eot: int):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    config = model.config
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
        activation_function="gelu",  # exact erf GELU, as F.gelu; GPT-2's default is the tanh one
        layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot)
    hf_model = GPT2LMHeadModel(hf_config)
    hf_model.load_state_dict(gpt2_state_dict(model), strict=True)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT,
                                           unk_token=EOT, model_max_length=config.block_size)
    return hf_model, hf_tokenizer


def _megatron_bert(model: GPT, tokenizer: Tokenizer, eot: int):
    from transformers import MegatronBertConfig, MegatronBertForMaskedLM, PreTrainedTokenizerFast

    config = model.config
    hf_config = MegatronBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=4 * config.n_embd,
        hidden_act="gelu",  # exact erf GELU, as F.gelu
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=config.block_size, type_vocab_size=2, layer_norm_eps=1e-5,
        pad_token_id=eot, tie_word_embeddings=True, is_decoder=False)
    hf_model = MegatronBertForMaskedLM(hf_config)
    hf_model.load_state_dict(megatron_bert_state_dict(model), strict=True)
    # [MASK] at the encoder's mask id; padding (batches of unequal texts) is masked out by
    # the attention mask, so any id serves: <|endoftext|>
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=with_mask_token(tokenizer, config),
                                           mask_token=MASK, pad_token=EOT, unk_token=EOT,
                                           model_max_length=config.block_size,
                                           model_input_names=["input_ids", "attention_mask"])
    return hf_model, hf_tokenizer


def export_hf(checkpoint: Path, tokenizer_json: Path, out_dir: Path) -> Path:
    """Write checkpoint and tokenizer as a Hugging Face folder at out_dir: config.json,
    model.safetensors (GPT2LMHeadModel, or MegatronBertForMaskedLM for a masked LM),
    generation_config.json (GPT-2) and the tokenizer files."""
    checkpoint, tokenizer_json, out_dir = Path(checkpoint), Path(tokenizer_json), Path(out_dir)
    # everything here is local: never let transformers reach for the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model, _ = load_model(checkpoint)
    config = model.config
    if not tokenizer_json.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_json}: pass the tokenizer.json trained with the corpus")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"{tokenizer_json} has no {EOT} token: pass the tokenizer trained with the corpus")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"{tokenizer_json} has {tokenizer.get_vocab_size()} tokens but {checkpoint} embeds only "
                         f"{config.vocab_size}: pass the tokenizer the model was trained with")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"{out_dir} holds files that are not an export: choose an empty or new folder")

    hf_model, hf_tokenizer = (_gpt2 if config.causal else _megatron_bert)(model, tokenizer, eot)

    # write beside out_dir, then swap in: out_dir is never a half-written export
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp)
    hf_tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
