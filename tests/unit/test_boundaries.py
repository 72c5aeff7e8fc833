"""The layers keep their dependencies: the engine, the request objects and the gRPC front import
neither torch nor transformers; only the servicer imports the generated protobuf code; only the
metrics module imports prometheus_client."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "server" / "tokenloom"

TORCH_FREE = (
    "tokenloom.request",
    "tokenloom.fault",
    "tokenloom.engine.engine",
    "tokenloom.engine.scheduler",
    "tokenloom.engine.block_manager",
    "tokenloom.engine.sequence",
    "tokenloom.engine.batch",
    "tokenloom.engine.generation",
    "tokenloom.engine.beam_search",
    "tokenloom.engine.stopping",
    "tokenloom.engine.draws",
    "tokenloom.front.servicer",
    "tokenloom.front.stream",
    "tokenloom.front.admission",
    "tokenloom.front.validation",
    "tokenloom.front.preprocessor",
)


def test_the_engine_requests_and_front_import_without_torch_or_transformers(tmp_path):
    # A None entry in sys.modules makes `import torch` raise ImportError, naming the importer.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            + "".join(f"import {module}\n" for module in TORCH_FREE)
            + "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def _importers(prefix: str) -> set[str]:
    """Modules of the server package that import `prefix` (or something under it)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name == prefix or name.startswith(prefix + ".") for name in names):
                found.add(path.relative_to(PACKAGE).as_posix())
    return found


def test_only_the_servicer_imports_the_generated_protobuf_code():
    assert _importers("tokenloom_client.pb") == {"front/servicer.py"}


def test_only_the_metrics_module_imports_prometheus_client():
    assert _importers("prometheus_client") == {"metrics.py"}
