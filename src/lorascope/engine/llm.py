"""LLM: offline generation through the embedded engine (vLLM's `LLM.generate` shape)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorascope.adapters.source import AdapterSource
from lorascope.config import EngineConfig
from lorascope.engine.engine import LLMEngine
from lorascope.engine.request import Request
from lorascope.engine.sampling import SamplingParams


@dataclass(slots=True)
class Completion:
    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    error: str | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, req: Request, engine: LLMEngine) -> Completion:
        tok = engine.tokenizer
        return cls(
            req.request_id, req.adapter, req.prompt_ids, list(req.output_ids),
            tok.decode(req.output_ids) if tok else None, req.finish_reason, req.error, req.logits,
            {
                "arrival_time": req.arrival_time,
                "first_token_time": req.first_token_time,
                "finish_time": req.finish_time,
                "wait_steps": req.wait_steps,
                "skipped": req.skipped,
                "preemptions": req.preemptions,
            },
        )


class LLM:
    """`LLM(model="tiny", adapters="adapters/", max_loras=8).generate(prompts, params, adapter=...)`."""

    def __init__(self, model: str = "tiny", adapters: Path | str | dict[str, Path] | AdapterSource | None = None, **engine_args: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args), adapters)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """All prompts go in at once (mixed batches); completions come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, Sequence) and not isinstance(adapter, str) else [adapter] * n
        if len(params_list) != n or len(adapters) != n:
            raise ValueError(f"{n} prompts but {len(params_list)} params and {len(adapters)} adapters")
        reqs: list[Request] = []
        try:
            for p, sp, a in zip(prompts, params_list, adapters, strict=True):
                reqs.append(self.engine.add_request(p, sp, a))
        except Exception:
            for r in reqs:  # all or nothing: no half-added batch lingers in the engine
                self.engine.abort(r.request_id)
            raise
        while self.engine.has_unfinished():
            self.engine.step()
        return [Completion.of(r, self.engine) for r in reqs]

    def close(self) -> None:
        self.engine.close()
