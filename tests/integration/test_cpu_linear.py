"""Prepacked oneDNN linear layers give the model's own logits, and do not keep a second copy of the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenloom.executor import cpu_linear


@pytest.mark.skipif(not cpu_linear.available(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_linears_match_f_linear_and_release_untied_weights(kind, tiny_dirs):
    reference = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind]).eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind]).eval()
    linears = [m for m in packed.modules() if isinstance(m, torch.nn.Linear)]
    assert cpu_linear.pack_linears(packed) == len(linears) > 0
    ids = torch.tensor([list(range(100, 160))])
    with torch.inference_mode():
        expected, got = reference(ids).logits, packed(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    tied = packed.get_output_embeddings().weight is packed.get_input_embeddings().weight
    released = [m for m in linears if m.weight.numel() == 0]
    assert len(released) == len(linears) - (1 if tied else 0)
    # No parameter still lives in the memory-mapped checkpoint: it would stay resident beside the
    # packed copies. (Other models loaded from the same file in this process may map it too.)
    checkpoint = str(tiny_dirs[kind] / "model.safetensors")
    maps = Path("/proc/self/maps")
    ranges = [tuple(int(a, 16) for a in line.split()[0].split("-"))
              for line in (maps.read_text().splitlines() if maps.exists() else []) if line.endswith(checkpoint)]
    assert ranges or not maps.exists(), "the reference model should still map the checkpoint"
    inside = [name for name, p in packed.named_parameters() if p.numel()
              and any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert inside == []


def test_row_buckets_bound_the_shapes_and_waste_at_most_an_eighth():
    buckets = {cpu_linear.rows_bucket(rows) for rows in range(1, 4097)}
    assert len(buckets) <= 32 + 16 * 7  # exact to 32, then 16 per doubling up to 4096
    for rows in range(1, 4097):
        padded = cpu_linear.rows_bucket(rows)
        assert rows <= padded <= rows * 1.0625
        assert cpu_linear.rows_bucket(padded) == padded
