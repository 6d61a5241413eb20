"""Sequence: the engine's state for one generated completion (a request with n > 1 has n)."""

from __future__ import annotations

from enum import Enum, auto
import itertools

from mistral_serve.engine.params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class SequenceFinish(str, Enum):
    STOP = "stop"  # end of sequence, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the server


_sequence_ids = itertools.count()


class Sequence:
    """Token ids (prompt then output), how many of them are in the KV cache, and the block table.

    Invariant: num_computed_tokens <= num_tokens; the sequence needs a forward pass over
    token_ids[num_computed_tokens:], and samples a token when that pass reaches the end.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 max_total_tokens: int, leader: Sequence | None = None, tenant: str = ""):
        self.seq_id = next(_sequence_ids)
        self.request_id = request_id
        self.index = index  # choice index within the request
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_total_tokens = max_total_tokens  # the context limit this sequence may grow to
        self.leader = leader  # for n > 1: siblings wait until the leader's prompt is cached, then share it
        self.tenant = tenant  # who asked (an API key): the scheduler admits tenants in turn
        self.status = SequenceStatus.WAITING
        self.finish_reason: SequenceFinish | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hash of each full block, in order
        self.arrival_order = self.seq_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_tokens - self.num_prompt_tokens
        return room if self.params.max_tokens is None else min(room, self.params.max_tokens)

    def can_start(self) -> bool:
        """Siblings of an n > 1 request start once the leader's prompt is in the cache."""
        leader = self.leader
        return leader is None or leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.name})")
