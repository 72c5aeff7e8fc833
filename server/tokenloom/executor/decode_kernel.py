"""The CPU decode-attention kernel (kernels/paged_decode.cpp), built once per machine.

Decode rows read their keys and values where they lie in the paged store instead of gathering
a padded copy first (the torch path: a block-wise `index_select` and SDPA). Built as
kernel_build.py says; without a compiler, or with `--attention-kernel torch`, the torch path runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import kernel_build

SOURCE = Path(__file__).with_name("kernels") / "paged_decode.cpp"
# Vectorised float reductions need reassociation; infinities stay meaningful (softmax's max).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]


@functools.cache
def load():
    """The compiled `paged_decode` function, or None where it cannot be built (logged once)."""
    module = kernel_build.build("tokenloom_paged_decode", SOURCE, ["paged_decode"], CFLAGS,
                                "CPU decode-attention kernel")
    return None if module is None else module.paged_decode


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32
