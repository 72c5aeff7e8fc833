"""The random numbers of sampled requests: one uniform per drawn token, a pure function of its place.

A seeded request's k-th generated token of sample `index` is drawn with
`uniform(seed, index, k)`: a counter-based stream, not a generator whose state advances. So the
same seed gives the same tokens whatever else shares the batch, after a preemption (the row
recomputes and draws token k again with the same number), after a restart, or on another
replica. Every uint64 seed is valid, and distinct seeds give distinct streams: each stage below
is a bijection of 64-bit integers (SplitMix64's finaliser), so for a fixed (index, k) two
seeds never collide. A request without a seed gets a fresh random 64-bit seed at admission.

The uniform has 53 random bits, as a Python float; the sampler inverts the CDF of the row's
filtered distribution with it.
"""

from __future__ import annotations

import secrets

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
SEED_BITS = 64


def _mix(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers with full avalanche."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, index: int, k: int) -> float:
    """The uniform in [0, 1) for generated token `k` of sample `index` of a request seeded `seed`."""
    h = _mix(_mix(_mix(seed & _MASK) ^ index) ^ k)
    return (h >> 11) * 2.0**-53


def fresh_seed() -> int:
    return secrets.randbits(SEED_BITS)
