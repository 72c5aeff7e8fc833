"""The engine on another device (CUDA), against HF `generate` on the same device: `make gpu-check`
sets TOKENLOOM_TEST_DEVICE; without it these tests skip (the CPU is covered everywhere else).

float32: the same tokens as HF, greedy and beam, in one continuous batch. bfloat16: our packed,
paged kernels round differently from HF's, and a bf16 logit carries 8 bits, so near-ties flip and a
flipped token changes the rest of its prompt's output; at least 75 % of greedy tokens agree (a prompt
counts only the tokens before its first divergence; on the CPU the tiny models gave 81-100 %).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_reference import hf_beam_search, hf_generate
from test_engine import Harness
from tiny_models import KINDS

DEVICE = os.environ.get("TOKENLOOM_TEST_DEVICE", "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="set TOKENLOOM_TEST_DEVICE=cuda (make gpu-check does) to run")
LENGTHS = [3, 17, 40, 90, 150, 7]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_beams_match_hf_on_the_device(kind, dtype, tiny_dirs):
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind], dtype=torch_dtype, local_files_only=True)
    model = model.to(DEVICE).eval()
    h = Harness(tiny_dirs[kind], device=DEVICE, dtype=dtype)
    assert str(h.runtime.served.device).startswith(DEVICE)
    rng = random.Random(kind)
    prompts = [[rng.randrange(100, 5000) for _ in range(n)] for n in LENGTHS]
    ids = [h.submit(p, max_new_tokens=16) for p in prompts]
    beam = h.submit(prompts[1], max_new_tokens=10, num_beams=4, num_return_sequences=2)
    h.run_until_idle()
    agreed = total = 0
    for prompt, rid in zip(prompts, ids):
        expected = hf_generate(model, prompt, do_sample=False, max_new_tokens=16)
        got = h.outputs[rid].token_ids
        if dtype == "float32":
            assert got == expected
        agreed += next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected))
        total += len(expected)
    assert agreed / total >= 0.75, f"{agreed}/{total} greedy tokens agree in {dtype}"
    if dtype == "float32":
        eos = set(h.runtime.eos_token_ids)
        expected, _ = hf_beam_search(model, prompts[1], eos, max_new_tokens=10, num_beams=4, num_return_sequences=2)
        assert [list(x.token_ids) for x in h.outputs[beam].hypotheses] == expected
