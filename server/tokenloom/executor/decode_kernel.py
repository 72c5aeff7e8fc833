"""The CPU decode-attention kernel (kernels/paged_decode.cpp), built once per machine.

Decode rows read their keys and values where they lie in the paged store instead of gathering
a padded copy first (the torch path: a block-wise `index_select` and SDPA). torch compiles the
C++ source with the system compiler on first use and caches the library under
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`); later starts load it in
milliseconds. Without a compiler, or with `--attention-kernel torch`, the torch path runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "paged_decode.cpp"
# Vectorised float reductions need reassociation; infinities stay meaningful (softmax's max).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]

_kernel = None


def load():
    """The compiled `paged_decode` function, or None where it cannot be built (logged once)."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    return _kernel or None


def _build():
    try:
        from torch.utils.cpp_extension import load_inline

        started = time.monotonic()
        log.info("loading the CPU decode-attention kernel (compiled once per machine, about a minute)")
        module = load_inline(
            name="tokenloom_paged_decode", cpp_sources=[SOURCE.read_text()], functions=["paged_decode"],
            extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
        )
        log.info("CPU decode-attention kernel ready in %.1f s", time.monotonic() - started)
        return module.paged_decode
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still works
        log.warning("the CPU decode-attention kernel is unavailable (%s); using the torch path", exc)
        return False


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32
