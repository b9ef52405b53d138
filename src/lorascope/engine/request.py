"""Request: one generation's state as it moves waiting -> running -> finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from lorascope.engine.sampling import SamplingParams

# an output token sampled on the device whose value has not reached the host yet (pipelined steps,
# engine.py): the next step reads it from the device; `Request.pending` counts them
PENDING = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_step: int = 0
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    # what the scheduler did to it
    admitted_step: int | None = None  # first admission
    skipped: int = 0  # times passed over because its adapter could not join the running set
    preemptions: int = 0
    wait_bound_step: int | None = None  # fair policy: the step by which it is guaranteed to start
    first_token_time: float | None = None
    first_token_step: int | None = None  # the step that computed its first token (TTFT in steps)
    finish_time: float | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    # set by the loop that hands out outputs: how many tokens were already reported
    num_reported: int = 0
    # pipelined steps: the last `pending` output ids are PENDING; the newest one is row `pending_idx`
    # of its step's device-sampled tokens
    pending: int = 0
    pending_idx: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_resolved(self) -> int:
        """Output tokens whose values are known on the host."""
        return len(self.output_ids) - self.pending

    def drop_pending(self) -> None:
        """Forget the unresolved tokens (the request stopped or was aborted before they arrived)."""
        if self.pending:
            del self.output_ids[-self.pending :]
            self.pending = 0

    @property
    def wait_steps(self) -> int | None:
        return None if self.admitted_step is None else self.admitted_step - self.arrival_step

    @property
    def finished(self) -> bool:
        """Finished, and every token it produced is on the host."""
        return self.status is Status.FINISHED and self.pending == 0
