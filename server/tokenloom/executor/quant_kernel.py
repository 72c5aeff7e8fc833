"""The CPU kernel for block-quantized linear layers (kernels/quant_gemm.cpp), built once per machine.

torch compiles the C++ source with the system compiler on first use and caches the library under
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`); later starts load it in milliseconds.
Without a compiler, quant.QuantLinear falls back to a float32 copy of its de-quantized weight.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "quant_gemm.cpp"
# No -ffast-math: each output is one fixed chain of fused multiply-adds, and reassociating it would
# let a row's result depend on the code path (row tile) it went through. -ffp-contract=off keeps the
# scalar fallback's arithmetic exactly as written too.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]

_kernel = None


def load():
    """The compiled `quant_gemm(x, packed, kind)` function, or None where it cannot be built (logged once)."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    return _kernel or None


def _build():
    try:
        from torch.utils.cpp_extension import load_inline

        started = time.monotonic()
        log.info("loading the CPU quantized-linear kernel (compiled once per machine, about a minute)")
        module = load_inline(
            name="tokenloom_quant_gemm", cpp_sources=[SOURCE.read_text()], functions=["quant_gemm"],
            extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
        )
        log.info("CPU quantized-linear kernel ready in %.1f s", time.monotonic() - started)
        return module.quant_gemm
    except Exception as exc:  # no compiler, no ninja, a build error: the float32 fallback still works
        log.warning("the CPU quantized-linear kernel is unavailable (%s); using float32 weights", exc)
        return False
