"""Native model code: the model families we serve, written as a loop over layers of plain torch calls.

`build(hf_model)` turns a loaded HF model into a `NativeModel` (layers.py) whose `forward(input_ids,
positions, batch, logits_index)` runs one packed step (attention.py's batch) and returns float32
logits at `logits_index` only; or None for a model type or feature there is no code for here (the
runner keeps the HF modules then). It writes the KV store where and as the HF path does, so the two
can take turns within one request.

What it saves, and what was tried (SmolLM2-135M decode steps at 1 / 8 / 32 / 64 rows, one torch
thread, paths alternating step by step on a shared 2-core machine, medians of three runs;
tests/bench/native_step.py):
- Outside the linears and attention the HF modules spend 9 / 11 / 14 / 19 ms a step (module
  dispatch, RMSNorm as ~8 ops, rotary as ~10). Here a Llama layer is ten calls: fused q|k|v and
  gate|up linears, residual adds fused into the oneDNN linears, rotary plus the KV write in one C++
  call and RMSNorm in one (kernels.py), cos/sin gathered once a step, final norm and LM head at the
  kept positions only: 1.9 / 2.6 / 4.9 / 7.7 ms (torch ops in place of the two C++ calls: 4.7 /
  5.9 / 10.4 / 15.5). Fewer, larger linears save 4-9 ms more at 1-32 rows, 0-2 at 64.
- torch.compile of the per-layer elementwise work: not used. A compiled region costs more per call
  than the eager ops it replaces (RMSNorm 22 vs 10 us at 1 row, 33 vs 23 us at 64 rows; silu*mul
  20 vs 6 us), a layer needs three (attention and the linears sit between them), and even these
  small dynamic-shape graphs took 16 s to compile cold. The C++ calls take 0.6 us (rotary + KV
  write) and 3.5 us (RMSNorm) at 1 row.
- Buffers kept across steps: not used. An allocation costs ~1 us and filling a fresh [64, 3072]
  tensor costs what filling a kept one does (glibc reuses the pages); the oneDNN linears have no
  out= form anyway.
"""

from __future__ import annotations

import logging

import torch

from . import gpt2, llama
from .layers import LinearFactory, NativeModel, fused_weight

log = logging.getLogger(__name__)

_FAMILIES = {**{t: llama for t in llama.MODEL_TYPES}, **{t: gpt2 for t in gpt2.MODEL_TYPES}}
_CLASSES = {llama: llama.LlamaModel, gpt2: gpt2.GPT2Model}

__all__ = ["LinearFactory", "NativeModel", "build", "fused_weight"]


def build(hf_model: torch.nn.Module, fused_ops: bool = True, linear: LinearFactory | None = None) -> NativeModel | None:
    """The native model computing what `hf_model` computes, or None where there is no code for it.

    On success the HF model's linear weights are released (the native model holds them, packed for
    the device) and the HF model cannot run any more; on None it is untouched. Call it before
    `cpu_linear.pack_linears`, which takes the weights this needs. `fused_ops=False` keeps the
    elementwise work in torch ops (kernels.py) where C++ kernels would otherwise run it. `linear`
    makes the linears it answers for (quantized weights; layers.LinearFactory), the rest are dense."""
    model_type = hf_model.config.model_type
    family = _FAMILIES.get(model_type)
    if family is None:
        log.info("no native code for model type %r; running the HF modules", model_type)
        return None
    reason = family.unsupported(hf_model)
    if reason is not None:
        log.info("no native code for this %s model (%s); running the HF modules", model_type, reason)
        return None
    if any(p.numel() == 0 for p in hf_model.parameters()):
        raise ValueError("the model's weights were released already (pack_linears or an earlier build)")
    return _CLASSES[family](hf_model, fused_ops=fused_ops, linear=linear)
