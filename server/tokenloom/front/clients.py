"""The tokens file (--auth-tokens-file): bearer tokens mapped to client ids and their own limits.

    {"clients": [
      {"token": "3f9a...", "client_id": "alice", "max_streams": 4, "rate_limit": 10},
      {"token": "77c2...", "client_id": "bob"}
    ]}

`max_streams` and `rate_limit` are optional and override --max-streams-per-client and
--rate-limit-per-client for that client (0 = unlimited). A client id may have several tokens (to
rotate one), all with the same limits. The server reads the file at start and again on SIGHUP; a
file that does not load on a reload leaves the table in use as it was.

Tokens are kept only as SHA-256 digests, and a presented token is found by its digest: the lookup
time depends on the digest, which tells an attacker nothing about any token's prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .admission import ClientLimits

log = logging.getLogger(__name__)

_FIELDS = {"token", "client_id", "max_streams", "rate_limit"}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class ClientTable:
    """Who each token belongs to, and each client's own limits."""

    clients: Mapping[bytes, str]  # SHA-256 of a token -> client id
    limits: Mapping[str, ClientLimits]  # client id -> its limits

    def client_of(self, token: str) -> str | None:
        return self.clients.get(_digest(token))

    @classmethod
    def parse(cls, text: str) -> "ClientTable":
        """The table of a tokens file's text; ValueError says what is wrong, never quoting a token."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        entries = doc.get("clients") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError('expected {"clients": [{"token": ..., "client_id": ...}, ...]} with one client or more')
        clients: dict[bytes, str] = {}
        limits: dict[str, ClientLimits] = {}
        for i, entry in enumerate(entries):
            where = f"clients[{i}]"
            if not isinstance(entry, dict) or set(entry) - _FIELDS:
                raise ValueError(f"{where}: an object with the keys {sorted(_FIELDS)} only")
            token, client = entry.get("token"), entry.get("client_id")
            if not isinstance(token, str) or not token.strip() or token != token.strip():
                raise ValueError(f"{where}: 'token' must be a non-empty string without surrounding spaces")
            if not isinstance(client, str) or not client:
                raise ValueError(f"{where}: 'client_id' must be a non-empty string")
            try:
                own = ClientLimits(rate_limit_per_client=entry.get("rate_limit"),
                                   max_streams_per_client=entry.get("max_streams"))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            if _digest(token) in clients:
                raise ValueError(f"{where}: the same token as an earlier entry")
            if limits.setdefault(client, own) != own:
                raise ValueError(f"{where}: client {client!r} has other limits in an earlier entry")
            clients[_digest(token)] = client
        return cls(clients, limits)


class TokensFile:
    """The table of one tokens file, as last loaded successfully."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.table = self._load()  # ValueError at start: the server does not start with a bad file

    def reload(self) -> bool:
        """Read the file again; on failure log why and keep the table in use."""
        try:
            table = self._load()
        except ValueError as exc:
            log.error("%s; still using the %d tokens loaded before", exc, len(self.table.clients))
            return False
        self.table = table
        log.info("reloaded %s: %d tokens for %d clients", self.path, len(table.clients), len(table.limits))
        return True

    def _load(self) -> ClientTable:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the tokens file (--auth-tokens-file): {exc}") from None
        try:
            return ClientTable.parse(text)
        except ValueError as exc:
            raise ValueError(f"tokens file {self.path} (--auth-tokens-file): {exc}") from None
