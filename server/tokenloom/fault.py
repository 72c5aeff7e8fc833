"""Test-only fault injection (`--inject-fault`): lets the tests prove that a fault in one
request fails only that request, and that a dead engine ends every open stream.

A fault is aimed at the requests whose sampling `seed` equals the one named in the flag, so a
test picks its victim by the seed it sends. Off unless the flag is given; never on by default.
The plan wraps the engine's choice of a request's mode (`FaultPlan.wrap(generation.start)`), so
the engine's own step carries no fault hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine.generation import Generation, GenerationContext
from .engine.scheduler import ScheduledChunk
from .engine.sequence import SequenceGroup

KINDS = ("sample-error", "engine-death")


class InjectedFault(RuntimeError):
    """Raised in one request's own bookkeeping: that request fails alone."""


class InjectedEngineDeath(BaseException):
    """Raised on admission, past the engine's per-request handling (which catches `Exception`
    only), as a bug in the engine itself would: the engine thread dies."""


@dataclass(frozen=True)
class FaultPlan:
    # A request with this seed raises in its own step once it has this many tokens.
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
            if kind not in KINDS or not seed.isdigit():
                raise ValueError(f"--inject-fault takes KIND=SEED with KIND one of {', '.join(KINDS)} and SEED a "
                                 f"non-negative integer; got {spec!r}")
            fields[kind.replace("-", "_") + "_seed"] = int(seed)
        return cls(**fields)

    @property
    def active(self) -> bool:
        return self.sample_error_seed is not None or self.engine_death_seed is not None

    def wrap(self, start):
        """`start` (the engine's mode factory) with this plan's faults aimed at their seeds."""
        if not self.active:
            return start

        def faulty_start(group: SequenceGroup, context: GenerationContext) -> Generation:
            seed, request_id = group.request.params.seed, group.request_id
            if seed is not None and seed == self.engine_death_seed:
                raise InjectedEngineDeath(f"injected engine death on admitting request {request_id}")
            generation = start(group, context)
            if seed is not None and seed == self.sample_error_seed:
                generation.row = _failing_after(generation.row, self.sample_error_after, request_id)
            return generation

        return faulty_start


def _failing_after(row, num_generated: int, request_id: str):
    def failing_row(chunk: ScheduledChunk):
        if chunk.seq.num_generated >= num_generated:
            raise InjectedFault(f"injected fault in the sampling of request {request_id}")
        return row(chunk)

    return failing_row
