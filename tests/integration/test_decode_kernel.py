"""The C++ decode-attention kernel reads the paged store in place and agrees with the torch path
(block gather + SDPA) on ragged contexts, shared blocks and grouped-query heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenloom import attention, decode_kernel

kernel = decode_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="the kernel could not be built here (see the log)")


@pytest.mark.parametrize("kv_heads,group,dim", [(3, 3, 64), (4, 1, 16), (2, 2, 32)])
def test_kernel_matches_gather_and_sdpa(kv_heads, group, dim):
    torch.manual_seed(kv_heads * 100 + dim)
    block_size, num_blocks, rows = 16, 64, 9
    k_store = torch.randn(num_blocks * block_size, kv_heads, dim)
    v_store = torch.randn(num_blocks * block_size, kv_heads, dim)
    lens = torch.tensor([1, 2, 15, 16, 17, 40, 100, 129, 200])
    width = -(-int(lens.max()) // block_size)
    shared = torch.randperm(num_blocks)[:width]  # rows 0 and 1 share their first block, like forked beams
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in range(rows)])
    tables[1, 0] = tables[0, 0] = shared[0]
    q = torch.randn(rows, kv_heads, group, dim)
    scale = dim**-0.5

    got = kernel(q, k_store, v_store, tables, lens, block_size, scale)

    k = attention._gather_blocks(k_store, tables, block_size)
    v = attention._gather_blocks(v_store, tables, block_size)
    mask = (torch.arange(width * block_size)[None, :] < lens[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
