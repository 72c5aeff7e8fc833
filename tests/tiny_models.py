"""Tiny random-init causal LMs for tests: real architectures, real tokenizer, seconds to build on CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from tokenloom.executor.models import ensure_default_model

KINDS = ("llama", "qwen2", "gpt2")
# At the default init (0.02) ~1-4 % of positions have a top-1/top-2 logit gap under 1e-3, near enough
# a tie for batched and unbatched fp32 kernels to disagree, and tied models greedily repeat one token.
# 0.2 (measured on random prompts): median gap ~0.25, ~0.3 % under 1e-3, varied greedy continuations.
_INIT_RANGE = 0.2


def default_model_dir() -> Path:
    return ensure_default_model()


def _config(kind: str, vocab: int, bos: int | None, eos: int, pad: int):
    ids = {"vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
           "initializer_range": _INIT_RANGE}
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512,
                          tie_word_embeddings=True, **ids)
    shape = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "max_position_embeddings": 512}
    if kind == "llama":
        return LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **shape, **ids)
    if kind == "qwen2":
        # Tied like the small Qwen2 checkpoints, so the two Llama-like kinds cover both head layouts.
        return Qwen2Config(num_hidden_layers=3, tie_word_embeddings=True, **shape, **ids)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {KINDS}")


def build_tiny_model(kind: str, out_dir: Path, *, tokenizer_dir: Path,
                     eos_token_id: int | None = None, seed: int = 0) -> Path:
    """Save a random-init `kind` model + tokenizer + generation_config into out_dir; return out_dir."""
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = _config(kind, len(tokenizer), tokenizer.bos_token_id, eos, pad)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
