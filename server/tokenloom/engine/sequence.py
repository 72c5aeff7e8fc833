"""Sequences and the groups they belong to, as the scheduler and engine see them: pure Python.

A sequence is a token list whose first `num_computed` tokens have KV in the
store. Prefill and decode are the same operation: compute the tokens from
`num_computed` on, and when the last one is computed, sample the next token.

A request is a group of sequences scheduled, preempted and finished together:
one sequence for plain requests, `num_beams` beams or `num_return_sequences`
samples once the prompt is prefilled (they fork from it and share its KV).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..request import GenerationRequest


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # its client stopped reading: out of the steps until it reads again
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    token_ids: list[int]
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix caching (block_manager.py): how many of the table's first full blocks are named, and the
    # id of the last one's name (0: none).
    named_blocks: int = 0
    tail_name: int = 0

    @classmethod
    def from_request(cls, seq_id: int, request: GenerationRequest) -> "Sequence":
        return cls(seq_id=seq_id, request=request, token_ids=list(request.prompt_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def reusable_prefix_len(self) -> int:
        """Leading tokens whose KV may come from the prefix cache: all but the last, whose logits
        are needed, and for scoring none from the first position whose log-prob is asked for."""
        n = len(self.token_ids) - 1
        if self.request.score_from is not None:
            n = min(n, self.request.score_from - 1)
        return max(n, 0)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not computed yet (1 for a decoding sequence)."""
        return len(self.token_ids) - self.num_computed

    def child(self, seq_id: int, token_ids: list[int], block_table: list[int]) -> "Sequence":
        """A sequence continuing this one's computed KV (shared blocks) with its own tokens."""
        return Sequence(seq_id, self.request, token_ids, self.status, self.num_computed, block_table,
                        self.named_blocks, self.tail_name)


@dataclass(eq=False)
class SequenceGroup:
    request: GenerationRequest
    seqs: list[Sequence]
    status: Status = Status.WAITING
    cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache, at first admission

    @classmethod
    def from_request(cls, seq_id: int, request: GenerationRequest) -> "SequenceGroup":
        return cls(request, [Sequence.from_request(seq_id, request)])

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def width(self) -> int:
        """Rows the group may occupy in one step (all its beams or samples)."""
        return max(self.request.params.width, len(self.seqs))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)
