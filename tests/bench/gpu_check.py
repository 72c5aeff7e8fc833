"""`make gpu-check`: the engine's CUDA path on a machine with a GPU, in one short run (< 8 minutes).

The GPU machines this project is lent reach no package registry and lack some of our dependencies,
so the check comes in two halves:

    make gpu-check-prepare   # here, with the registries: writes .gpu-check/ (ignored by git)
    make gpu-check           # there, with .gpu-check/ and client/tokenloom_client/pb/ carried along

`prepare` writes a ~1B Llama config (TinyLlama-1.1B's shape with SmolLM2's tokenizer, served with
--load-format dummy; the tests build their tiny models from that tokenizer) and downloads wheels for Python 3.12
of what the GPU image lacks (grpcio-health-checking, grpcio-reflection, asyncio-throttle, gguf), with
the grpcio and protobuf they were generated against. `run` installs those wheels into .gpu-check/site
(no index), runs tests/integration/test_device_parity.py on the device (greedy and beams against HF
`generate` there, float32 and bfloat16), then the bench's quick sweep over gRPC (1/8/32 streams) and
the engine alone with the 1B config in bfloat16; results land in .gpu-check/bench/.
`run --device cpu` goes through the same steps on the CPU (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / ".gpu-check"
WHEELS = ("grpcio-health-checking", "grpcio-reflection", "asyncio-throttle", "gguf", "grpcio", "protobuf")
# TinyLlama-1.1B's shape; the vocabulary is SmolLM2's, whose tokenizer the config is served with.
LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def prepare() -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "server"), str(ROOT / "client")]
    from tiny_models import default_model_dir
    from transformers import AutoTokenizer

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    tokenizer_dir = default_model_dir()
    big = OUT / "llama-1b"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenizer.save_pretrained(big)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    (big / "config.json").write_text(json.dumps({**LLAMA_1B, **ids}, indent=2))
    wheels = OUT / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    print(f"wheels for Python 3.12: {' '.join(pins)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *pins], check=True)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {size / 2**20:.0f} MiB; carry it and client/tokenloom_client/pb to the GPU machine", flush=True)


def run(device: str) -> int:
    if not (OUT / "llama-1b" / "config.json").exists():
        print(f"{OUT} is missing or incomplete: run `make gpu-check-prepare` first", file=sys.stderr)
        return 2
    # The tests build their tiny models from the default model's tokenizer, which the 1B dir holds.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENLOOM_TEST_DEVICE=device,
               TOKENLOOM_TOKENIZER_DIR=str(OUT / "llama-1b"))
    site = OUT / "site"
    if device != "cpu":  # the GPU image: our wheels, installed beside (and before) its packages
        wheels = sorted((OUT / "wheels").glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    steps = [
        ("parity on the device", [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                                  "tests/integration/test_device_parity.py"]),
        ("bench, 1B config, bfloat16", [
            sys.executable, "tests/bench/run.py", "--quick", "--model", str(OUT / "llama-1b"),
            "--out", str(OUT / "bench"), "--skip", "probes", "sequential", "static", "continuous",
            "--beam-requests", "0",
            "--server-args", f"--load-format dummy --device {device} --dtype bfloat16 --kv-cache-tokens 65536"]),
    ]
    failed = []
    for name, command in steps:
        print(f"== {name} ({time.monotonic() - started:.0f} s)", flush=True)
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            failed.append(name)
    print(f"== done in {time.monotonic() - started:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all passed"))
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="write .gpu-check/ (here, with the package registries)")
    r = sub.add_parser("run", help="the check itself (on the GPU machine)")
    r.add_argument("--device", default="cuda", help="torch device (default cuda; cpu for a smoke run)")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare()
        return 0
    return run(args.device)


if __name__ == "__main__":
    sys.exit(main())
