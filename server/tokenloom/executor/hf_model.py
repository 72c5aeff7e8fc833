"""The HF modules behind the native models' interface: for model types native/ has no code for.

Attention is tokenloom's own (attention.paged_attention, registered with transformers'
AttentionInterface when the model is loaded); the packed step is one `[1, T]` sequence, and
`logits_to_keep` runs the LM head at the kept positions only.
"""

from __future__ import annotations

import torch

from .attention import AttentionBatch


class HFModel:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                logits_index: torch.Tensor) -> torch.Tensor:
        """`[K, vocab]` float32 logits at the packed positions `logits_index`."""
        logits = self.model(
            input_ids=input_ids[None], position_ids=positions[None], logits_to_keep=logits_index,
            use_cache=False, tokenloom_batch=batch,
        ).logits[0]
        return logits.float()
