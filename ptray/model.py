"""Build a Hugging Face model from config: GPT-2 or Llama (causal LM), BERT (masked LM). Single-device code only:
nothing here knows about Ray or DeepSpeed."""

from __future__ import annotations

import importlib.util
import os

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config,
                          LlamaConfig, PretrainedConfig, PreTrainedModel)

from ptray.config import ModelConfig
from ptray.errors import ConfigError

FAMILIES = {"gpt2": "gpt2", "llama": "llama", "bert": "bert"}  # ptray family -> HF model_type


def padded_vocab_size(tokenizer_vocab_size: int, multiple: int = 64) -> int:
    """Round the embedding up to a multiple of 64: faster matmuls, and room for a few added tokens."""
    return -(-tokenizer_vocab_size // multiple) * multiple


def hf_config(cfg: ModelConfig, *, vocab_size: int, special_ids: dict[str, int | None]) -> PretrainedConfig:
    """The transformers config for a ptray model section (vocab_size already resolved)."""
    eos, pad = special_ids.get("eos"), special_ids.get("pad")
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
            n_head=cfg.num_heads, n_inner=cfg.intermediate_size or None, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
            tie_word_embeddings=cfg.tie_embeddings)
    if cfg.family == "llama":
        intermediate = cfg.intermediate_size or 64 * -(-int(8 * cfg.hidden_size / 3) // 64)
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=intermediate,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_positions,
            rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout, bos_token_id=eos, eos_token_id=eos,
            pad_token_id=pad, tie_word_embeddings=cfg.tie_embeddings)
    assert cfg.family == "bert", cfg.family
    return BertConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        max_position_embeddings=cfg.max_positions, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad if pad is not None else 0,
        tie_word_embeddings=cfg.tie_embeddings)


def auto_class(family: str):
    return AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM


def build_model(cfg: ModelConfig, *, vocab_size: int, special_ids: dict[str, int | None]) -> PreTrainedModel:
    """A randomly initialized model (seed torch first), or the local HF model in `cfg.init_from`."""
    check_attention(cfg.attention)
    if cfg.init_from:
        try:
            model = auto_class(cfg.family).from_pretrained(cfg.init_from, local_files_only=True, dtype=torch.float32,
                                                           attn_implementation=cfg.attention)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, truncated or corrupt weights
            raise ConfigError(f"model.init_from={cfg.init_from!r}: its weights could not be loaded "
                              f"({type(e).__name__}: {str(e)[:300]}); point it at a complete Hugging Face model "
                              "directory (config.json and model.safetensors).") from None
    else:
        model = auto_class(cfg.family).from_config(hf_config(cfg, vocab_size=vocab_size, special_ids=special_ids),
                                                   dtype=torch.float32, attn_implementation=cfg.attention)
    return model


def check_attention(attention: str) -> None:
    """flash_attention_2 needs the flash-attn package, which transformers would only report deep inside a worker."""
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attention=flash_attention_2 needs the flash-attn package (pip install flash-attn "
                          "--no-build-isolation) on every GPU node; or use model.attention=sdpa.")


def init_from_info(path: str) -> PretrainedConfig:
    """The config of a local HF model directory, with a clear error when it is missing or unreadable."""
    if not os.path.isdir(path):
        raise ConfigError(f"model.init_from={path!r} is not a directory; give a local Hugging Face model directory.")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ConfigError(f"model.init_from={path!r} has no loadable config.json ({e}).") from None


def num_params(model: torch.nn.Module) -> int:
    """All parameters, also when ZeRO-3 has partitioned them (ds_numel: the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def flops_per_token(hf_cfg: PretrainedConfig, num_params_: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights plus 12·L·H·T for attention (PaLM appendix B)."""
    num_layers = hf_cfg.num_hidden_layers
    hidden = hf_cfg.hidden_size
    return 6 * num_params_ + 12 * num_layers * hidden * seq_len
