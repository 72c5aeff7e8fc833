"""Building our C++ CPU kernels (kernels/*.cpp, native/fused_ops.cpp), once per machine.

torch compiles a source with the system compiler on first use and caches the library under
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`); later starts load it in
milliseconds. `make install` builds every kernel ahead of the first server start. Without a
compiler (or on a build error) the caller's torch fallback runs, with one warning in the log.

The kernels are compiled with `-march=native`, and torch's cache knows the flag's text, not the CPU
it meant: a cache (or a container image) built on one CPU would crash with an illegal instruction on
an older one. So each library's name carries a key of the instruction set `-march=native` chose here
(`cpu_key`): another CPU type compiles its own.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def cpu_key() -> str:
    """8 hex digits naming the target `-march=native` means on this machine: the compiler's (`$CXX`,
    as torch's build uses) own answer (`-Q --help=target`: the -march it picked and every -m feature on or off), else the CPU's
    flags from /proc/cpuinfo, else "generic"."""
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "-march=native", "-Q", "--help=target"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        target = "\n".join(line.split()[0] + " " + line.split()[-1] for line in out.splitlines()
                           if re.match(r"\s+-m(arch=|tune=|[a-z0-9-]+\s+\[(enabled|disabled)\])", line))
    except (OSError, subprocess.SubprocessError, IndexError):
        target = ""
    if not target:
        try:
            flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
            target = " ".join(sorted(flags.group(1).split())) if flags else ""
        except OSError:
            target = ""
    return hashlib.sha256(target.encode()).hexdigest()[:8] if target else "generic"


def build(name: str, source: Path, functions: list[str], cflags: list[str], what: str):
    """The compiled extension module, or None where it cannot be built. `what` names it in the log."""
    try:
        from torch.utils.cpp_extension import load_inline

        started = time.monotonic()
        log.info("loading the %s (compiled once per machine, a minute or so)", what)
        if "-march=native" in cflags:
            name = f"{name}_{cpu_key()}"
        module = load_inline(name=name, cpp_sources=[source.read_text()], functions=functions,
                             extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
        log.info("%s ready in %.1f s", what, time.monotonic() - started)
        return module
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still works
        log.warning("the %s is unavailable (%s); using the torch path", what, exc)
        return None
