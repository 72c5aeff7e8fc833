"""HF transformers `generate`, the oracle our outputs are compared with."""

from __future__ import annotations

import torch


def hf_generate(model, prompt_ids: list[int], **kwargs) -> list[int]:
    """Generated ids (prompt excluded) of HF `generate` for one request alone."""
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=model.generation_config.pad_token_id
            if model.generation_config.pad_token_id is not None else 0, **kwargs,
        )
    return out[0, len(prompt_ids):].tolist()


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)
