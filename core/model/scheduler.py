"""Which sequences run in the next engine step, and what each feeds the model.

A `Sequence` is one request's life on the engine: its prompt ids, its row of the KV cache, its
sampler and detokenizer, and how far it has got. The `Scheduler` keeps the waiting queue and
the running set, hands out cache rows, and plans each step: one token for every row that is
decoding, then prompt chunks for rows being prefilled, within a token budget, so a long prompt
is read over several steps while the others keep decoding. It owns no thread and no model.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.model.decoding import IncrementalDetokenizer
from core.model.requests import StreamSink

if TYPE_CHECKING:
    from core.model.sampling import RowSampler


@dataclass(frozen=True)
class Segment:
    """Tokens of one row fed in one step: `tokens` go to positions `start`, `start + 1`, ...;
    `wants_logits` asks for the next-token logits after the last of them; `slot` is the adapter
    slot its tokens compute with (0: the base model)."""

    row: int
    start: int
    tokens: list[int]
    wants_logits: bool
    slot: int = 0


@dataclass
class Prepared:
    """A request made ready to queue: prompt ids that fit, the answer's token budget, and the
    notices to show (a capped budget, a prompt cut to fit)."""

    prompt: list[int]
    max_new_tokens: int
    notices: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Sequence:
    """One request on the engine, from the queue to its last token."""

    sink: StreamSink
    prepared: Prepared | None = None  # None until the model's tokenizer has read it
    sampler: RowSampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    adapter_slot: int = 0  # 0 = the base model (adapters come with their own slots)
    row: int | None = None
    fed: int = 0  # tokens in this row's KV cache
    generated: int = 0
    next_token: int | None = None  # sampled, not yet fed

    @property
    def prompt(self) -> list[int]:
        assert self.prepared is not None
        return self.prepared.prompt

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class Scheduler:
    """Waiting and running sequences over a fixed number of cache rows."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free = list(range(rows))  # a heap: the lowest free row first, so rows stay packed

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def admit(self, place: Callable[[Sequence], bool] = lambda _: True) -> list[Sequence]:
        """Move waiting sequences into free rows, oldest first; returns those admitted.

        `place` readies a sequence's adapter (its slot); when it cannot (every adapter slot is
        busy), that sequence and those behind it wait, so none is passed over for long."""
        admitted = []
        while self.waiting and self._free:
            if not place(self.waiting[0]):
                break
            sequence = self.waiting.popleft()
            sequence.row = heapq.heappop(self._free)
            self.running.append(sequence)
            admitted.append(sequence)
        return admitted

    def drop_cancelled(self, *, running: bool) -> list[Sequence]:
        """Take out the waiting sequences whose callers cancelled, and the running ones too when
        `running` (only between steps, on the worker); returns them, to be told they ended."""
        dropped = [s for s in self.waiting if s.sink.cancelled]
        for sequence in dropped:
            self.waiting.remove(sequence)
        if running:
            stopped = [s for s in self.running if s.sink.cancelled]
            for sequence in stopped:
                self.retire(sequence)
            dropped += stopped
        return dropped

    def retire(self, sequence: Sequence) -> None:
        """Take a running sequence out and give its row back."""
        self.running.remove(sequence)
        if sequence.row is not None:
            heapq.heappush(self._free, sequence.row)
            sequence.row = None

    def plan(self, prefill_budget: int) -> list[tuple[Sequence, Segment]]:
        """The next step: every decoding row (by row, so packed rows read the cache without a
        copy), then prompt chunks in arrival order until `prefill_budget` tokens are spent
        (at least one chunk, so a prefill always advances)."""
        decoding = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.row or 0)
        step: list[tuple[Sequence, Segment]] = []
        for s in decoding:
            assert s.row is not None and s.next_token is not None
            step.append((s, Segment(s.row, s.fed, [s.next_token], True, s.adapter_slot)))
        budget = prefill_budget
        for s in self.running:
            if not s.prefilling:
                continue
            if budget <= 0 and len(step) > len(decoding):
                break
            assert s.row is not None
            count = min(len(s.prompt) - s.fed, max(budget, 1))
            done = s.fed + count == len(s.prompt)
            step.append(
                (s, Segment(s.row, s.fed, s.prompt[s.fed : s.fed + count], done, s.adapter_slot))
            )
            budget -= count
        return step
