"""Scheduler: the continuous-batching policy. Pure Python, no tensors.

Every step gets a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, oldest first: a decode costs one token, an unfinished prompt takes
the next chunk that fits. Then waiting sequences are admitted, their cached prefix taken from the
prefix cache and their prompt chunked to fit what is left of the budget: preempted sequences
first, then, fairly between tenants, the oldest sequence of the tenant with the fewest running (of
those, the one served longest ago): a tenant with a hundred requests queued cannot starve one with
one. A tenant named "group/member" (an account and one of its keys) is fair first between groups,
then between a group's members: an account cannot take more turns by spreading over many keys.
When blocks run out, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed (mostly from the prefix cache) later.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.sequence import Sequence, SequenceFinish, SequenceStatus


MAX_REMEMBERED_TENANTS = 10_000  # past this, tenants with nothing queued or running are forgotten


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    start_position: int  # seq.num_computed_tokens when scheduled
    num_new_tokens: int  # tokens fed this step: seq.token_ids[start_position:start_position + num_new_tokens]
    samples_token: bool  # the step reaches the end of the sequence, so a new token comes out


def _scheduled(seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
    start = seq.num_computed_tokens
    return ScheduledSequence(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens)


def _group(tenant: str) -> str:
    """The group of a tenant "group/member" (a tenant without "/" is alone in its group), named
    "group/": groups and tenants share one table of counts."""
    return tenant.partition("/")[0] + "/"


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: frozenset[int]):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start, for metrics
        self._num_admissions = 0
        # prompt tokens looked up in the prefix cache at first admission, and those found (vLLM's metrics)
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0
        self._last_admission: dict[str, int] = {}  # group or tenant → the serial of its latest admission

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        # running sequences: decodes and prompts already part-way through
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(_scheduled(seq, num_new))
                budget -= num_new
                i += 1
        # waiting sequences, in arrival order, while nothing had to be preempted
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return scheduled

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        num_running_by_tenant = Counter(seq.tenant for seq in self.running)
        num_running_by_tenant.update(_group(seq.tenant) for seq in self.running)
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_to_admit(num_running_by_tenant)
            if seq is None:
                break
            cached_block_ids = self.block_manager.find_cached_prefix(seq)
            num_cached = len(cached_block_ids) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_new, cached_block_ids):
                break
            self.waiting.remove(seq)
            num_running_by_tenant[seq.tenant] += 1
            num_running_by_tenant[_group(seq.tenant)] += 1
            self._num_admissions += 1
            self._last_admission[seq.tenant] = self._last_admission[_group(seq.tenant)] = self._num_admissions
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
                self.num_prefix_cache_queries += seq.num_prompt_tokens
                self.num_prefix_cache_hits += seq.num_cached_tokens
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(_scheduled(seq, num_new))
            budget -= num_new
        return budget

    def _next_to_admit(self, num_running_by_tenant: Counter) -> Sequence | None:
        """A preempted sequence (it was running: it goes back first), else the oldest waiting sequence
        of the group with the fewest running, and within it of the tenant with the fewest running;
        None if none can start (n > 1 siblings wait for their leader's prompt)."""
        best, best_rank = None, None
        for seq in self.waiting:
            if not seq.can_start():
                continue
            if seq.num_preemptions:
                return seq
            group = _group(seq.tenant)
            rank = (num_running_by_tenant[group], self._last_admission.get(group, 0),
                    num_running_by_tenant[seq.tenant], self._last_admission.get(seq.tenant, 0))
            if best is None or rank < best_rank:  # strictly: a tenant's oldest sequence stands for it
                best, best_rank = seq, rank
        if len(self._last_admission) > MAX_REMEMBERED_TENANTS:
            self._forget_idle_tenants()
        return best

    def _forget_idle_tenants(self) -> None:
        present = {seq.tenant for seq in self.waiting} | {seq.tenant for seq in self.running}
        present |= {_group(tenant) for tenant in present}
        self._last_admission = {tenant: serial for tenant, serial in self._last_admission.items()
                                if tenant in present}

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, scheduled: list[ScheduledSequence], sampled_token_ids: list[int | None]) -> None:
        """Advance each scheduled sequence by the tokens it fed; append sampled tokens and stop
        the sequences that hit a token-level limit (EOS, a stop token, max_tokens, the context)."""
        for item, token_id in zip(scheduled, sampled_token_ids):
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if token_id is None:
                continue
            seq.append_token(token_id)
            reason = self._token_finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)

    def _token_finish_reason(self, seq: Sequence, token_id: int) -> SequenceFinish | None:
        params = seq.params  # the sampler keeps these tokens out until min_tokens are out
        if token_id in params.stop_token_ids:
            return SequenceFinish.STOP
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return SequenceFinish.STOP
        if seq.num_output_tokens >= seq.max_output_tokens:
            return SequenceFinish.LENGTH
        return None

    def finish(self, seq: Sequence, reason: SequenceFinish) -> None:
        """End the sequence now and give its blocks back."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
