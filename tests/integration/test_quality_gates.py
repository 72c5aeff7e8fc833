"""What each executor mode guarantees on the default model, against HF transformers as the oracle.

- fp32 (`--quantization none`, native code): HF `generate`'s greedy tokens, token for token.
- The GGUF's own blocks (`--quantization gguf`, the default): the same de-quantized weights as the
  fp32 copy HF loads, multiplied by our kernel in another order, so only float rounding separates
  them: at least 98 % of greedy tokens agree with HF's over 32 prompts x 64 tokens (a prompt counts
  only the tokens before its first divergence, which is reported), and the perplexity of a fixed
  text is within 1 % of HF's.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_reference import chat_ids, hf_generate
from test_engine import Harness

pytestmark = pytest.mark.slow

TOPICS = [
    "the moon", "bread", "volcanoes", "the French revolution", "photosynthesis", "chess", "rainbows",
    "the ocean", "honey bees", "the internet", "gravity", "Mount Everest", "coffee", "penguins",
    "the Roman empire", "electricity", "music theory", "deserts", "the human heart", "trains",
    "clouds", "Shakespeare", "vaccines", "the Sahara", "origami", "tea", "black holes", "bicycles",
    "the Nile", "glaciers", "jazz", "dinosaurs",
]
TEXT = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks "
        "were striking thirteen. Call me Ishmael. Some years ago, never mind how long precisely, having "
        "little or no money in my purse, I thought I would sail about a little and see the watery part "
        "of the world.")


def engine_greedy(h: Harness, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    ids = [h.submit(p, max_new_tokens=max_new_tokens) for p in prompts]
    h.run_until_idle(limit=5000)
    return [h.outputs[rid].token_ids for rid in ids]


def hf_greedy_batched(model, prompts: list[list[int]], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
    """HF `generate` on all prompts at once (left padded), each cut after its first EOS."""
    pad = model.generation_config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def hf_perplexity(model, prompt: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]
    return math.exp(-float(logp.mean()))


@pytest.fixture(scope="module")
def default_hf(default_dir, hf_models):
    return hf_models(default_dir)


def test_fp32_native_path_equals_hf_generate(default_hf):
    model, tok = default_hf
    h = Harness(None, quantization="none", model_impl="native")
    assert (h.runtime.model.impl, h.runtime.model.quantization) == ("native", "none")
    prompts = [chat_ids(tok, f"Tell me about {topic}.") for topic in TOPICS[:4]]
    got = engine_greedy(h, prompts, 32)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_generate(model, prompt, do_sample=False, max_new_tokens=32)


def test_gguf_blocks_agree_with_hf_on_the_same_dequantized_weights(default_hf):
    model, tok = default_hf
    h = Harness(None, max_seqs=32, budget=512, quantization="gguf")
    assert (h.runtime.model.impl, h.runtime.model.quantization) == ("native", "gguf")
    prompts = [chat_ids(tok, f"Write two sentences about {topic}.") for topic in TOPICS]
    ours = engine_greedy(h, prompts, 64)
    theirs = hf_greedy_batched(model, prompts, 64, set(h.runtime.eos_token_ids))
    agreed, divergences = 0, []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreed += same
        if a != b:
            divergences.append(f"prompt {i}: first divergence at token {same} of {len(b)}")
    total = sum(len(b) for b in theirs)
    print(f"greedy agreement {agreed}/{total} ({agreed / total:.1%}); " + ("; ".join(divergences) or "no divergence"))
    assert agreed / total >= 0.98, divergences

    prompt = tok.encode(TEXT[:44])
    continuation = tok.encode(TEXT[44:], add_special_tokens=False)
    rid = h.score(prompt, continuation)
    h.run_until_idle()
    ours_ppl = math.exp(-sum(h.outputs[rid].logprobs) / len(continuation))
    theirs_ppl = hf_perplexity(model, prompt, continuation)
    print(f"perplexity {ours_ppl:.4f} (gguf blocks) vs {theirs_ppl:.4f} (HF, de-quantized fp32)")
    assert abs(ours_ppl - theirs_ppl) <= 0.01 * theirs_ppl
