"""A process's memory and CPU time from /proc, and what its memory should be made of.

CPU seconds per wall second tell how much of the machine a system actually got: on a shared
machine another job's load shows up there, not in the throughput numbers alone.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

MiB = 2**20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """VmRSS of `pid` (or RssAnon: heap and tensors; RssFile: mapped files); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def rss_parts(pid: int) -> dict[str, int]:
    return {field: rss_bytes(pid, field) for field in ("VmRSS", "RssAnon", "RssFile")}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of `pid` (None: this process), all threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread; `peak()` since the last `reset()`."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes(self.pid)
            with self._lock:
                self._peak = max(self._peak, rss)

    def reset(self) -> None:
        with self._lock:
            self._peak = rss_bytes(self.pid)

    def peak(self) -> int:
        with self._lock:
            return max(self._peak, rss_bytes(self.pid))


def weights_bytes(model_dir: Path) -> int:
    on_disk = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    if on_disk:
        return on_disk
    # A config-only directory (--load-format dummy): the fp32 size of the model it describes.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return 4 * sum(p.numel() for p in model.parameters())


def kv_store_bytes(server_log: str, model_dir: Path, kv_tokens: int, dtype: str) -> int:
    """From the server's "KV store: ... MiB" log line, else computed from the model config."""
    match = re.search(r"KV store: .*?([\d.]+) MiB", server_log)
    if match:
        return int(float(match.group(1)) * MiB)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return kv_tokens * 2 * config["num_hidden_layers"] * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


class CpuClock:
    """CPU seconds used by this process (and `pid`, if given) inside a `with` block."""

    def __init__(self, pid: int | None = None):
        self.pid = pid
        self.seconds = 0.0

    def _now(self) -> float:
        return cpu_seconds() + (cpu_seconds(self.pid) if self.pid else 0.0)

    def __enter__(self) -> "CpuClock":
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self._now() - self._start
