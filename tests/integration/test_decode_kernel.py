"""The C++ decode-attention kernel reads the paged store in place and agrees with exact (float64)
attention over the gathered blocks on ragged contexts, shared blocks, grouped-query heads, peaky softmax."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tokenloom.executor import attention, decode_kernel, kernel_build

kernel = decode_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="the kernel could not be built here (see the log)")


# 9 rows keep both threads busy a row at a time; 2 rows are split by KV head.
@pytest.mark.parametrize("rows", [9, 2])
# Head sizes the kernel specialises (64, 32; whole AVX2 registers) and others (16, 48).
@pytest.mark.parametrize("kv_heads,group,dim", [(3, 3, 64), (4, 1, 16), (2, 2, 32), (1, 4, 48)])
# A large query scale makes softmax peaky: most weights underflow to exactly 0.
@pytest.mark.parametrize("sharpness", [1.0, 40.0])
def test_kernel_matches_gather_and_sdpa(rows, kv_heads, group, dim, sharpness):
    torch.manual_seed(kv_heads * 100 + dim + rows)
    block_size, num_blocks = 16, 64
    k_store = torch.randn(num_blocks * block_size, kv_heads, dim)
    v_store = torch.randn(num_blocks * block_size, kv_heads, dim)
    lens = torch.tensor([1, 2, 15, 16, 17, 40, 100, 129, 200])[-rows:]
    width = -(-int(lens.max()) // block_size)
    shared = torch.randperm(num_blocks)[:width]  # rows 0 and 1 share their first block, like forked beams
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in range(rows)])
    tables[-1, 0] = tables[0, 0] = shared[0]
    q = torch.randn(rows, kv_heads, group, dim) * sharpness
    scale = dim**-0.5

    got = kernel(q, k_store, v_store, tables, lens, block_size, scale)

    k = attention._gather_blocks(k_store, tables, block_size)
    v = attention._gather_blocks(v_store, tables, block_size)
    mask = (torch.arange(width * block_size)[None, :] < lens[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
    assert got.shape == expected.shape
    # Against float64: float32 rounding of the scores grows with their size (SDPA in float32 is off by
    # about half as much at sharpness 40).
    error = (got.double() - expected).abs().max().item()
    assert error < 1e-6 * (sharpness + 1), error


COMPILER = os.environ.get("CXX", "c++")


def _gcc() -> bool:
    try:
        return "Free Software Foundation" in subprocess.run([COMPILER, "--version"], capture_output=True,
                                                           text=True).stdout
    except OSError:
        return False


@pytest.mark.skipif(not _gcc(), reason="the target a compiler picks is read with GCC's -Q --help=target")
def test_the_compiled_kernel_is_named_by_the_cpu_it_was_compiled_for(tmp_path):
    """-march=native code from one CPU type must not load on another: the library's name carries
    the instruction set the compiler picked, so an older CPU (here: the compiler told to target
    plain x86-64, as on a node without AVX2) gets another name and compiles its own."""
    assert kernel.__module__ == f"tokenloom_paged_decode_{kernel_build.cpu_key()}"
    older = tmp_path / "c++"
    older.write_text(f'#!/bin/sh\nexec {shutil.which(COMPILER)} "$@" -march=x86-64 -mtune=generic\n')
    older.chmod(0o755)
    probe = "from tokenloom.executor.kernel_build import cpu_key; print(cpu_key())"
    keys = [subprocess.run([sys.executable, "-c", probe], env={**os.environ, **extra}, capture_output=True,
                           text=True, check=True).stdout.strip() for extra in ({}, {"CXX": str(older)})]
    assert keys[0] == kernel_build.cpu_key() and re.fullmatch(r"[0-9a-f]{8}", keys[1]) and keys[1] != keys[0]
