"""Live requests on the engine side, one small class per decoding mode, chosen once at admission."""

from __future__ import annotations

from ..sequence import SequenceGroup
from .base import Generation, GenerationContext, TokenText
from .beam import BeamGeneration
from .sampled import SampledGeneration
from .score import ScoreGeneration

__all__ = ["Generation", "GenerationContext", "TokenText", "start"]


def start(group: SequenceGroup, context: GenerationContext) -> Generation:
    """The mode of `group`'s request: scoring, beam search, or greedy / sampled (n samples)."""
    request = group.request
    if request.score_from is not None:
        return ScoreGeneration(group, context)
    if request.params.is_beam:
        return BeamGeneration(group, context)
    return SampledGeneration(group, context)
