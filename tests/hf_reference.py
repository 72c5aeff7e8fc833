"""HF transformers `generate`, the oracle our outputs are compared with."""

from __future__ import annotations

import torch


def hf_generate(model, prompt_ids: list[int], **kwargs) -> list[int]:
    """Generated ids (prompt excluded) of HF `generate` for one request alone."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=model.generation_config.pad_token_id
            if model.generation_config.pad_token_id is not None else 0, **kwargs,
        )
    return out[0, len(prompt_ids):].tolist()


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


def hf_beam_search(model, prompt_ids: list[int], eos_ids: set[int], **kwargs) -> tuple[list[list[int]], list[float]]:
    """HF beam search: each returned hypothesis (prompt stripped, cut after its first EOS) and its score."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    pad = model.generation_config.pad_token_id
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, output_scores=True,
            return_dict_in_generate=True, pad_token_id=pad if pad is not None else 0, **kwargs,
        )
    hyps = []
    for row in out.sequences[:, len(prompt_ids):].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        hyps.append(row[:cut])
    return hyps, out.sequences_scores.tolist()


def sequence_logprob(model, labels: list[int], prompt_len: int) -> tuple[list[float], float]:
    """The reference study's formula: log-softmax of the logits, gathered at the labels, summed from prompt_len."""
    ids = torch.tensor([labels])
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    per_token = logp[prompt_len - 1:]
    return per_token.tolist(), float(per_token.sum())
