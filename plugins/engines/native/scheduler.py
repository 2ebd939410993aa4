"""Which tokens the next forward pass computes, for which requests.

Every step runs one decode token for each running request that has its whole prompt in
the cache, plus prompt chunks of admitted requests, up to ``max_step_tokens`` tokens in
all (vLLM's chunked prefill): a long prompt is split over several steps, and a new
request's first token costs one step however many requests are decoding (their tokens ride
along in the same GEMMs). Requests are admitted first come, first served, while fewer than
``max_batch`` run and the cache has free blocks for their prompt.

When a decode token needs a block and none is free, the request admitted last is preempted
(vLLM's recompute policy): its blocks are freed and it goes back to the front of the queue
with its generated tokens appended to its prompt; nothing it produced is lost and it
finishes later. A request that could never fit (prompt + max_tokens above the whole cache)
is refused when it arrives, not here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockAllocator


@dataclass
class Sequence:
    """One request's tokens and where their keys and values are in the cache."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    state: object = None  # the session's per-request data (sampling, detokenizer)
    out_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.out_ids if self.out_ids else self.prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)


@dataclass
class Step:
    """One forward pass: ``work`` is (sequence, first position, token count) per sequence;
    ``sample`` lists the sequences whose last token this pass computes (they get a token)."""

    work: list[tuple[Sequence, int, int]]
    preempted: list[Sequence]

    @property
    def sample(self) -> list[Sequence]:
        return [s for s, start, n in self.work if start + n == s.num_tokens]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, _, n in self.work)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, *, max_batch: int,
                 max_step_tokens: int):
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.last_step: Step | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, seq: Sequence, upto: int) -> int:
        """Blocks ``seq`` still needs so that positions ``< upto`` have a slot."""
        return max(0, -(-upto // self.block_size) - len(seq.blocks))

    def _grow(self, seq: Sequence, upto: int) -> None:
        seq.blocks += self.allocator.allocate(self._blocks_for(seq, upto))

    def schedule(self) -> Step:
        work, preempted = [], []
        budget = self.max_step_tokens
        # 1. a decode token for every running request whose prompt is in the cache
        decoding = [s for s in self.running if s.computed == s.num_tokens - 1]
        for seq in decoding:
            if seq not in self.running:  # preempted below for an older request
                continue
            while self._blocks_for(seq, seq.num_tokens) > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self._grow(seq, seq.num_tokens)
                work.append((seq, seq.computed, 1))
                budget -= 1
        # 2. prompt chunks: running requests part-way through their prompt, then new ones
        for seq in self.running:
            if budget <= 0:
                break
            if seq.computed < seq.num_tokens - 1:
                budget -= self._chunk(seq, budget, work)
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self._blocks_for(seq, seq.num_tokens) > self.allocator.num_free:
                break  # wait for blocks to free up rather than preempt for a newcomer
            self.waiting.popleft()
            self.running.append(seq)
            # the whole prompt's blocks now: a half-computed prompt never waits for blocks
            self._grow(seq, seq.num_tokens)
            budget -= self._chunk(seq, budget, work)
        self.last_step = Step(work, preempted)
        return self.last_step

    @staticmethod
    def _chunk(seq: Sequence, budget: int, work: list) -> int:
        """Schedule the next piece of ``seq``'s prompt (all of it if the budget allows)."""
        n = min(seq.num_tokens - seq.computed, budget)
        work.append((seq, seq.computed, n))
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.computed = [], 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finished(self, step: Step) -> None:
        """Record that ``step`` ran: its tokens are now in the cache."""
        for seq, start, n in step.work:
            seq.computed = start + n

    def remove(self, seq: Sequence) -> None:
        """A request ended (finished or aborted): free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
