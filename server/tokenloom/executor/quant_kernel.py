"""The CPU kernel for block-quantized linear layers (kernels/quant_gemm.cpp), built once per machine.

Built as kernel_build.py says; without a compiler, quant.QuantLinear falls back to a float32 copy
of its de-quantized weight.
"""

from __future__ import annotations

import functools
from pathlib import Path

from . import kernel_build

SOURCE = Path(__file__).with_name("kernels") / "quant_gemm.cpp"
# No -ffast-math: each output is one fixed chain of fused multiply-adds, and reassociating it would
# let a row's result depend on the code path (row tile) it went through. -ffp-contract=off keeps the
# scalar fallback's arithmetic exactly as written too.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


@functools.cache
def load():
    """The compiled `quant_gemm(x, packed, kind)` function, or None where it cannot be built (logged once)."""
    module = kernel_build.build("tokenloom_quant_gemm", SOURCE, ["quant_gemm"], CFLAGS,
                                "CPU quantized-linear kernel")
    return None if module is None else module.quant_gemm
