"""Who a call is from: the client id that admission's per-client limits count under.

- With a tokens file (--auth-tokens-file), the client id of the call's bearer token; the metadata
  key is never read, so a client cannot spend another's budget or get a fresh one by renaming itself.
- Else, with --trust-client-id-metadata, the value of --client-id-metadata-key when the call has one
  (for a proxy in front that authenticates callers and sets the key itself).
- Else the peer's host, normalised (`peer_host`): every loopback address is one client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import unquote

from .auth import bearer_token
from .clients import TokensFile


LOOPBACK = "loopback"


def peer_host(peer: str) -> str:
    """gRPC's peer string without scheme and port, one name per host: 'ipv4:10.0.0.7:5312' -> '10.0.0.7',
    'ipv6:[::ffff:10.0.0.7]:5312' -> '10.0.0.7', and every loopback address (127.0.0.0/8, ::1) -> 'loopback',
    so that a client cannot get a second budget by reaching the server over another address family."""
    scheme, sep, address = unquote(peer).partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: the whole string is the identity
    host = address.rpartition(":")[0].strip("[]")  # '[::1]:5312' -> '::1'
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # without an IPv6 zone ('fe80::1%eth0')
    except ValueError:
        return host or peer
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return LOOPBACK if ip.is_loopback else str(ip)


def client_identity(metadata: Iterable[tuple[str, str]], peer: str, key: str) -> str:
    """The client's declared id under `key` (gRPC keys are lower case; "" reads none), else its host."""
    if key:
        key = key.lower()
        for k, value in metadata:
            if k == key and isinstance(value, str) and value:
                return value
    return peer_host(peer)


class Identify:
    def __init__(self, trusted_metadata_key: str = "", tokens: TokensFile | None = None):
        self.trusted_metadata_key = trusted_metadata_key  # "" when the metadata is not trusted
        self.tokens = tokens

    def __call__(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> str:
        if self.tokens is None:
            return client_identity(metadata, peer, self.trusted_metadata_key)
        presented, _ = bearer_token(metadata)
        client = self.tokens.table.client_of(presented) if presented else None
        # None only for a token that a reload removed after the interceptor let the call in.
        return client or client_identity((), peer, "")
