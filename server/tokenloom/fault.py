"""Test-only fault injection (`--inject-fault`): lets the tests prove that a fault in one
request fails only that request, and that a dead engine ends every open stream.

A fault is aimed at the requests whose sampling `seed` equals the one named in the flag, so a
test picks its victim by the seed it sends. Off unless the flag is given; never on by default.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("sample-error", "engine-death")


class InjectedFault(RuntimeError):
    """Raised where a fault was asked for."""


@dataclass(frozen=True)
class FaultPlan:
    # A request with this seed raises in its own sampling once it has this many tokens.
    sample_error_seed: int | None = None
    sample_error_after: int = 2
    # Admitting a request with this seed kills the engine thread.
    engine_death_seed: int | None = None

    @classmethod
    def parse(cls, specs: list[str] | None) -> "FaultPlan":
        """`KIND=SEED` items, e.g. `sample-error=7` or `engine-death=13`."""
        fields: dict[str, int] = {}
        for spec in specs or ():
            kind, _, seed = spec.partition("=")
            if kind not in KINDS or not seed.lstrip("-").isdigit():
                raise ValueError(f"--inject-fault takes KIND=SEED with KIND one of {', '.join(KINDS)}; got {spec!r}")
            fields[kind.replace("-", "_") + "_seed"] = int(seed)
        return cls(**fields)

    @property
    def active(self) -> bool:
        return self.sample_error_seed is not None or self.engine_death_seed is not None

    def on_sampling(self, seed: int | None, num_generated: int, request_id: str) -> None:
        if seed is not None and seed == self.sample_error_seed and num_generated >= self.sample_error_after:
            raise InjectedFault(f"injected fault in the sampling of request {request_id}")

    def on_admit(self, seed: int | None, request_id: str) -> None:
        if seed is not None and seed == self.engine_death_seed:
            raise InjectedFault(f"injected engine death on admitting request {request_id}")
