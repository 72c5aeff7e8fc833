"""The KV store: one tensor allocated once, addressed by block tables.

Layout: `[layers, 2 (k|v), num_blocks * block_size, kv_heads, head_dim]`. A token's
slot is `block * block_size + offset`; the block tables live in the pure
`BlockManager`, this module only holds the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mmap
import math

import torch


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "KVShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(num_layers=config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)


class KVCache:
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        dims = (shape.num_layers, 2, num_blocks * block_size, shape.num_kv_heads, shape.head_dim)
        # Zero-filled: padded gathers read unused slots, and 0 * finite stays finite.
        self.kv = _lazy_zeros(dims, dtype) if torch.device(device).type == "cpu" else \
            torch.zeros(dims, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each `[slots, kv_heads, head_dim]`."""
        return self.kv[index, 0], self.kv[index, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of forked sequences)."""
        if not pairs:
            return
        offsets = torch.arange(self.block_size, device=self.kv.device)
        src = torch.tensor([s for s, _ in pairs], device=self.kv.device)[:, None] * self.block_size + offsets
        dst = torch.tensor([d for _, d in pairs], device=self.kv.device)[:, None] * self.block_size + offsets
        self.kv[:, :, dst.flatten()] = self.kv[:, :, src.flatten()]


def _lazy_zeros(dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in an anonymous memory mapping: the kernel hands out zeroed pages on first touch, so the
    store costs resident memory only for the blocks that have held tokens (`torch.zeros` writes, and
    so makes resident, every byte at start)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, max(1, math.prod(dims) * itemsize))
    return torch.frombuffer(mapping, dtype=dtype).view(dims)
