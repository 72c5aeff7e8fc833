"""Block formats (Q4_0, Q4_1, Q8_0): our quantizer and de-quantizer agree with the gguf package's
reference bit for bit, the kernel's repacked layout loses nothing, and GGUF names and rotary row
order map onto HF's. No compiled kernel is needed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenloom.executor import quant

gguf = pytest.importorskip("gguf")

KINDS = ["q4_0", "q4_1", "q8_0"]
GGML = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q8_0": gguf.GGMLQuantizationType.Q8_0}


def awkward_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    """Random rows plus the blocks quantizers get wrong: all zero, constant, one spike, ties at .5."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-4, 1, out).unsqueeze(1)
    w[0, :32] = 0
    w[1, :32] = 0.37
    w[2, :32] = 0
    w[2, 5] = -3.0
    w[3, :32] = torch.arange(32) * 0.5 - 8  # exact multiples of the step: rounding ties
    w[4, 0], w[4, 1:32] = 127.0, torch.arange(31) - 14.5  # Q8_0 step 1: every value a tie (.5)
    return w


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_matches_the_gguf_reference_bit_for_bit(kind):
    w = awkward_weight(40, 96, seed=1)
    ours = quant.quantize(w, kind)
    ref = gguf.quants.quantize(w.numpy(), GGML[kind])
    assert ours.blocks.shape == (40, 3, quant.BLOCK_BYTES[kind])
    assert np.array_equal(ours.blocks.reshape(40, -1).numpy(), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_matches_the_gguf_reference_bit_for_bit(kind):
    # Arbitrary blocks, not only ones our quantizer makes: random quants, scales of every magnitude.
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (30, 4, quant.BLOCK_BYTES[kind]), dtype=torch.uint8, generator=g)
    scale_count = 2 if kind == "q4_1" else 1
    scales = torch.randn(30, 4, scale_count, generator=g) * torch.logspace(-6, 2, 30).view(30, 1, 1)
    blocks[..., : 2 * scale_count] = scales.half().view(torch.uint8)
    ours = quant.QuantWeight(kind, blocks).dequantize()
    ref = gguf.quants.dequantize(blocks.reshape(30, -1).numpy(), GGML[kind])
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))
    rows = torch.tensor([7, 0, 29])  # an embedding lookup de-quantizes only the rows asked for
    assert torch.equal(quant.QuantWeight(kind, blocks).dequantize(rows), ours[rows])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out", [24, 48, 7, 100])  # whole panels of 24 and padded ones
def test_the_kernel_layout_keeps_every_weight(kind, out):
    qw = quant.quantize(awkward_weight(out, 64, seed=out), kind)
    packed = quant.pack(qw)
    panels = -(-out // 24)
    block = 20 if kind != "q8_0" else 34  # q4_0 is packed as q4_1 (m = -8·d)
    assert packed.shape == (panels, 2, 24 * block) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack(packed, kind, torch.arange(out)), qw.dequantize())
    rows = torch.tensor([out - 1, 0, out // 2, out - 1])  # a tied embedding's lookup, repeats and all
    assert torch.equal(quant.unpack(packed, kind, rows), qw.dequantize(rows))


def test_gguf_names_map_to_hf_parameter_names():
    assert quant.hf_name("blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert quant.hf_name("blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight"
    assert quant.hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert quant.hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert quant.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert quant.hf_name("output_norm.weight") == "model.norm.weight"
    assert quant.hf_name("output.weight") == "lm_head.weight"
    assert quant.hf_name("rope_freqs.weight") is None
    assert quant.hf_name("blk.0.attn_qkv.weight") is None


@pytest.mark.parametrize("kind", KINDS)
def test_rotary_rows_are_put_back_in_hf_order_as_whole_rows_of_blocks(kind):
    heads, head_dim = 3, 8
    qw = quant.quantize(torch.randn(heads * head_dim, 64), kind)
    got = quant._unpermute_rotary(qw, heads).dequantize()
    # transformers' reverse permutation of the de-quantized weight, written out independently here
    dense = qw.dequantize().numpy()
    expected = dense.reshape(heads, head_dim // 2, 2, 64).swapaxes(1, 2).reshape(dense.shape)
    assert np.array_equal(got.numpy(), expected)
    assert torch.equal(quant._unpermute_rotary(qw.dequantize(), heads), got)


def test_stacked_weights_are_a_fused_projection():
    a, b = quant.quantize(torch.randn(24, 64)), quant.quantize(torch.randn(8, 64))
    fused = quant.QuantWeight.cat([a, b])
    assert fused.shape == (32, 64)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError, match="kinds and inputs must agree"):
        quant.QuantWeight.cat([a, quant.quantize(torch.randn(8, 64), "q8_0")])


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="unknown quantization"):
        quant.quantize(torch.randn(4, 64), "q5_k")
    with pytest.raises(ValueError, match=r"uint8 \[out, in / 32, 20\]"):
        quant.QuantWeight("q4_1", torch.zeros(4, 2, 18, dtype=torch.uint8))
