"""Building our C++ CPU kernels (kernels/*.cpp, native/fused_ops.cpp), once per machine.

torch compiles a source with the system compiler on first use and caches the library under
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`); later starts load it in
milliseconds. `make install` builds every kernel ahead of the first server start. Without a
compiler (or on a build error) the caller's torch fallback runs, with one warning in the log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def build(name: str, source: Path, functions: list[str], cflags: list[str], what: str):
    """The compiled extension module, or None where it cannot be built. `what` names it in the log."""
    try:
        from torch.utils.cpp_extension import load_inline

        started = time.monotonic()
        log.info("loading the %s (compiled once per machine, a minute or so)", what)
        module = load_inline(name=name, cpp_sources=[source.read_text()], functions=functions,
                             extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
        log.info("%s ready in %.1f s", what, time.monotonic() - started)
        return module
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still works
        log.warning("the %s is unavailable (%s); using the torch path", what, exc)
        return None
