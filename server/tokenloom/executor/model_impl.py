"""What the runner calls for a loaded model: native code or the HF modules, dense or quantized linears.

`--model-impl` auto | native | hf: native code (native/) where it exists for the model type (Llama,
Mistral without a sliding window, Qwen2, GPT-2), else transformers' modules with tokenloom's paged
attention. Both write the KV store alike and are called the same way:
`forward(input_ids [T], positions [T], batch, logits_index [K]) -> [K, vocab]` float32.

`--quantization` (native code on the CPU, float32 activations; quant.py runs the linears):
- none: the checkpoint's weights, on prepacked oneDNN kernels (fp32) or F.linear;
- gguf: the embedded default model's linear layers as its GGUF file stores them (Q4_1 blocks, the
  tied LM head Q8_0): nothing is re-quantized, and the values equal the de-quantized fp32 copy
  that `none` serves, so only float rounding tells the two apart;
- q4_0, q4_1, q8_0: a dense checkpoint's linears quantized at load (a tied LM head stays dense:
  it is the input embedding too);
- auto: gguf for the default model where the quantized kernel builds, none otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import cpu_linear, native, quant, quant_kernel
from .hf_model import HFModel
from .models import LoadedModel

log = logging.getLogger(__name__)

IMPLS = ("auto", "native", "hf")
QUANTIZATIONS = ("auto", "none", "gguf", "q4_0", "q4_1", "q8_0")


@dataclass(frozen=True)
class ModelImpl:
    model: native.NativeModel | HFModel
    impl: str  # "native" | "hf"
    quantization: str  # "none", "gguf" or a block format


def prepare(loaded: LoadedModel) -> ModelImpl:
    """The model as the runner will call it. The HF model cannot run on its own afterwards (its
    weights now live, packed or quantized, in what this returns)."""
    spec, model = loaded.spec, loaded.model
    if spec.model_impl not in IMPLS:
        raise ValueError(f"unknown model implementation {spec.model_impl!r}; choose one of {', '.join(IMPLS)}")
    quantization = _quantization(loaded)
    if spec.model_impl != "hf":
        quantizer = None if quantization == "none" else _Quantizer(loaded, quantization)
        built = native.build(model, linear=quantizer)
        if built is not None:
            if quantizer is not None:
                log.info("%d linear layers (fused) run %s blocks", quantizer.made, quantization)
                if not quantizer.made:  # e.g. widths that are no multiple of a block
                    if spec.quantization != "auto":
                        raise ValueError(f"--quantization {quantization}: no linear layer of this model can be "
                                         "quantized (their input widths must be multiples of 32)")
                    quantization = "none"
            return ModelImpl(built, "native", quantization)
        if spec.model_impl == "native" or spec.quantization not in ("auto", "none"):
            needs = "--model-impl native" if spec.model_impl == "native" else f"--quantization {spec.quantization}"
            raise ValueError(f"{needs} needs native code, and there is none for this {model.config.model_type} "
                             "model (see the log); use --model-impl hf --quantization none")
    device = next(model.parameters()).device
    if spec.linear_kernel == "auto" and cpu_linear.available(device, model.dtype):
        cpu_linear.pack_linears(model)
    return ModelImpl(HFModel(model), "hf", "none")


def _quantization(loaded: LoadedModel) -> str:
    spec, model = loaded.spec, loaded.model
    wanted = spec.quantization
    if wanted not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {wanted!r}; choose one of {', '.join(QUANTIZATIONS)}")
    cpu_fp32 = next(model.parameters()).device.type == "cpu" and model.dtype == torch.float32
    if wanted == "auto":
        usable = cpu_fp32 and spec.model_impl != "hf" and loaded.gguf_path is not None
        return "gguf" if usable and quant_kernel.load() is not None else "none"
    if wanted == "none":
        return wanted
    if spec.model_impl == "hf":
        raise ValueError(f"--quantization {wanted} runs on native code; drop --model-impl hf")
    if not cpu_fp32:
        raise ValueError(f"--quantization {wanted} runs on the CPU with float32 activations; "
                         "use --device cpu --dtype float32, or --quantization none")
    if wanted == "gguf" and loaded.gguf_path is None:
        raise ValueError("--quantization gguf serves the embedded default model's GGUF blocks; "
                         f"{loaded.name} has no GGUF file: use q4_1, q4_0 or q8_0 to quantize it at load")
    return wanted


class _Quantizer:
    """The native build's linear factory: a quantized linear for the HF linears it is asked for (fused
    side by side), or None to keep them dense. Counts what it quantized."""

    def __init__(self, loaded: LoadedModel, quantization: str):
        self.model = loaded.model
        self.kind = quantization
        self.file = quant.read_gguf(loaded.gguf_path) if quantization == "gguf" else None
        self.made = 0

    def __call__(self, names: list[str], modules: list[torch.nn.Module], transposed: bool):
        made = self._from_file(names, modules) if self.file is not None else self._from_dense(modules, transposed)
        self.made += made is not None
        return made

    def _from_file(self, names, modules):
        parts = [self.file.linear_weight(f"{name}.weight") for name in names]
        if not all(isinstance(p, quant.QuantWeight) for p in parts) or len({p.kind for p in parts}) > 1:
            return None
        if any(getattr(m, "bias", None) is not None for m in modules):
            return None
        return quant.QuantLinear(quant.QuantWeight.cat(parts))

    def _from_dense(self, modules, transposed):
        if self.model.get_output_embeddings() in modules and (
                self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight):
            return None  # a tied LM head is the input embedding too
        weight, bias = native.fused_weight(*modules, transposed=transposed)
        if weight.shape[1] % quant.BLOCK:
            return None
        return quant.QuantLinear.from_dense(weight, self.kind, bias)
