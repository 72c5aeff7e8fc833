"""tokenloom's Python SDK: sync and async gRPC clients, and the `tokenloom` CLI.

Imports only grpc, protobuf and the standard library, so it installs without torch.
Failed RPCs raise `grpc.RpcError`; see `tokenloom_client.client`.
"""

from .client import AsyncClient, Client
from .types import (
    ChatMessage,
    GenerationResult,
    Hypothesis,
    Limits,
    ModelInfo,
    ScoreResult,
    StreamChunk,
    TopToken,
    Usage,
)

__all__ = [
    "AsyncClient",
    "ChatMessage",
    "Client",
    "GenerationResult",
    "Hypothesis",
    "Limits",
    "ModelInfo",
    "ScoreResult",
    "StreamChunk",
    "TopToken",
    "Usage",
]
