"""LLMEngine: the wiring. `add_request` validates and queues; `step` schedules, runs the model once,
samples, and finishes requests. Everything else lives in the parts it wires together.

Pipelined steps (`async_scheduling`, on by default on CUDA): when every request that samples in a
step is greedy (no logits kept, no min_tokens pending), the step's tokens stay on the device and each
sampler gets a PENDING output id; `step` then returns without waiting for them, and the next `step`
schedules and launches step n+1 (whose inputs read those tokens on the device) before it waits for step
n's tokens and settles them (stop ids, streaming). The host's work thus runs beside the device's.
What this costs: a request that stops on a stop id computes one extra token, which is thrown away; one
that ends by length leaves the scheduler when its last token is launched. Any other step runs in
lockstep, as before: it settles the step in flight, then samples on the host.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from lorascope.adapters.cache import AdapterCache
from lorascope.adapters.peft import AdapterError
from lorascope.adapters.source import AdapterSource, DirectorySource
from lorascope.config import ConfigError, EngineConfig
from lorascope.engine.kv_cache import BlockManager
from lorascope.engine.request import PENDING, Request, Status
from lorascope.engine.runner import ModelRunner, SampledTokens
from lorascope.engine.sampling import SamplingParams, sample
from lorascope.engine.scheduler import Scheduler
from lorascope.model.config import LORA_TARGET_MODULES
from lorascope.model.lora import LoRASlotStore
from lorascope.model.weights import DTYPES, load_model


class PromptError(ValueError):
    """A prompt the engine cannot take (empty, too long, ids outside the vocabulary)."""


@dataclass(slots=True)
class StepRecord:
    step: int
    start_s: float
    duration_s: float
    num_seqs: int
    num_tokens: int
    num_adapters: int  # distinct adapters in the step
    skipped: int
    preempted: int
    parked: int = 0  # running requests left out because their adapter had no slot (fair policy)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, adapters: Path | str | dict[str, Path] | AdapterSource | None = None):
        self.cfg = cfg
        device = torch.device(cfg.device)
        dtype = DTYPES[cfg.dtype]
        loaded = load_model(cfg.model, cfg.dtype, cfg.device, max_len=cfg.max_model_len, seed=cfg.seed)
        self.model_name, self.model_cfg, self.tokenizer = loaded.name, loaded.cfg, loaded.tokenizer
        self.max_model_len = cfg.max_model_len or loaded.cfg.max_position_embeddings
        self.eos_ids = loaded.cfg.eos_token_id or (self.tokenizer.eos_ids if self.tokenizer else ())
        self.source = _make_source(adapters, cfg.adapter_load_latency_s)
        modules = tuple(cfg.lora_target_modules or LORA_TARGET_MODULES)
        self.store = LoRASlotStore(loaded.cfg, cfg.max_loras, cfg.max_lora_rank, dtype, device, modules)
        loaded.model.attach_lora(self.store)
        self.cache = AdapterCache(
            self.source, loaded.cfg, self.store, cfg.max_cpu_loras or cfg.max_loras, cfg.eviction, dtype, cfg.loader_threads,
            time_sliced=cfg.policy == "fair",
        )
        num_blocks = cfg.num_kv_blocks or self._default_num_blocks(dtype, device)
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ConfigError(
                f"the KV cache holds {num_blocks * cfg.block_size} tokens ({num_blocks} blocks of {cfg.block_size}) but "
                f"max_model_len is {self.max_model_len}: one full-length request could never run; lower max_model_len "
                "or give the cache more room (num_kv_blocks / kv_cache_gb)"
            )
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.blocks, self.cache)
        self.runner = ModelRunner(loaded.model, num_blocks, cfg.block_size, dtype, device, self.store, self.max_model_len,
                                  cfg.max_num_seqs, cfg.enforce_eager, cfg.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.steps: deque[StepRecord] = deque(maxlen=100_000)
        self._ids = itertools.count()
        self.pipelined = device.type == "cuda" if cfg.async_scheduling is None else cfg.async_scheduling
        self._inflight: tuple[list[Request], SampledTokens] | None = None  # a pipelined step's samplers and tokens
        # (step, start, end) CUDA events around each step's launches while trace_gpu(True) (benchmarks)
        self._gpu_trace: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] | None = None

    def _default_num_blocks(self, dtype: torch.dtype, device: torch.device) -> int:
        c = self.model_cfg
        bytes_per_block = 2 * c.num_hidden_layers * self.cfg.block_size * c.kv_size * torch.finfo(dtype).bits // 8
        if self.cfg.kv_cache_gb is not None:
            budget = self.cfg.kv_cache_gb * 2**30
        elif device.type == "cuda":
            budget = 0.9 * torch.cuda.mem_get_info(device)[0]
        else:
            budget = 2**29
        needed = self.cfg.max_num_seqs * -(-self.max_model_len // self.cfg.block_size)
        return max(1, min(int(budget // bytes_per_block), needed))

    # --- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if adapter is not None and not self.source.has(adapter):
            known = self.source.names()
            raise AdapterError(
                f"unknown adapter {adapter!r}; {len(known)} registered"
                + (f" (e.g. {', '.join(known[:3])})" if known else "; pass an adapter directory to the engine")
            )
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, adapter)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(f"model {self.model_name!r} has no tokenizer.json: pass prompts as token-id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise PromptError("the prompt is empty: give at least one token")
        vocab = self.model_cfg.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise PromptError(f"prompt token {bad!r} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                "(prompt plus at least one generated token): shorten the prompt or raise max_model_len"
            )
        return ids

    def preload(self, names: list[str], timeout_s: float = 600.0) -> None:
        """Load adapters into device slots now (warm-up); at most max_loras of them stay resident."""
        if len(names) > self.cfg.max_loras:
            raise ConfigError(f"cannot preload {len(names)} adapters into max_loras={self.cfg.max_loras} slots")
        deadline = time.monotonic() + timeout_s
        for name in names:
            if not self.source.has(name):
                raise AdapterError(f"unknown adapter {name!r}")
            self.cache.request_load(name, protected=set(names))
        while any(not self.cache.is_ready(n) for n in names):
            self.cache.wait_for_loads(0.1)
            self.cache.poll()
            failed = [n for n in names if n in self.cache.failed]
            if failed:
                raise AdapterError(f"adapter {failed[0]!r} failed to load: {self.cache.failed[failed[0]]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"adapters not loaded within {timeout_s} s")

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.finished:
            req.drop_pending()
            self.scheduler.finish(req, "abort")
            req.finish_time = time.monotonic()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def memory_bytes(self) -> dict[str, int]:
        """Where the memory goes: base weights, the KV-cache pool, the device adapter slots
        (allocated up front for max_loras x max_lora_rank) and the adapters the host tier holds now."""
        model = self.runner.model
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        host = sum(a.size_bytes for a in list(self.cache.host.values()))
        return {"weights": weights, "kv_cache": self.runner.kv_cache_bytes, "adapter_slots": self.store.size_bytes,
                "host_tier": host}

    # --- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one step. Returns the requests that produced a token or finished in it (with pipelined
        steps: whose tokens of the previous step reached the host now)."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        progressed = list(out.failed)
        if not out.scheduled:
            progressed += self._settle()
            if self.scheduler.has_work() and not progressed:
                self.cache.wait_for_loads(0.05)  # nothing runnable: waiting and parked requests wait on loads
            return self._report(progressed)
        trace = self._gpu_trace
        if trace is not None:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        samplers, logits = self.runner.execute(out.scheduled, self.cache.slot_of.__getitem__)
        self.cache.step_launched()
        if trace is not None:
            events[1].record()
            trace.append((out.step, *events))
        for req, n in out.scheduled:
            req.num_computed += n
        if logits is not None and self.pipelined and all(map(self._samples_on_device, samplers)):
            tokens = self.runner.sample_greedy(logits)
            for i, req in enumerate(samplers):
                if req.first_token_step is None:
                    req.first_token_step = out.step
                req.output_ids.append(PENDING)
                req.pending += 1
                req.pending_idx = i
                if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                    self.scheduler.finish(req, "length")  # leaves the batch now; done once its tokens arrive
            progressed += self._settle()
            self._inflight = (samplers, tokens)
        else:
            progressed += self._settle()
            if logits is not None:
                live = [i for i, r in enumerate(samplers) if r.status is not Status.FINISHED]  # not stopped meanwhile
                if len(live) < len(samplers):
                    samplers, logits = [samplers[i] for i in live], logits[live]
                raw = logits.clone() if any(r.params.return_logits for r in samplers) else logits
                tokens_now = sample(
                    logits,
                    [r.params for r in samplers],
                    [r.generator for r in samplers],
                    [len(r.output_ids) for r in samplers],
                    self.eos_ids,
                )
                now = time.monotonic()
                for i, (req, token) in enumerate(zip(samplers, tokens_now, strict=True)):
                    if req.first_token_step is None:
                        req.first_token_step = out.step
                    self._append(req, token, raw[i] if req.params.return_logits else None, now)
                    progressed.append(req)
        self.steps.append(
            StepRecord(out.step, start, time.perf_counter() - start, len(out.scheduled), out.num_tokens,
                       len(out.adapters), out.skipped, len(out.preempted), out.parked)
        )
        return self._report(progressed)

    def _samples_on_device(self, req: Request) -> bool:
        p = req.params
        return p.greedy and not p.return_logits and len(req.output_ids) >= p.min_tokens

    def _settle(self) -> list[Request]:
        """Wait for the pipelined step in flight, if any, and settle its tokens."""
        if self._inflight is None:
            return []
        samplers, tokens = self._inflight
        self._inflight = None
        values = tokens.tolist()
        now = time.monotonic()
        settled = []
        for req, token in zip(samplers, values, strict=True):
            if req.pending == 0:  # stopped or aborted since: its token is thrown away
                continue
            req.output_ids[len(req.output_ids) - req.pending] = token
            req.pending -= 1
            if req.first_token_time is None:
                req.first_token_time = now
            p = req.params
            if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
                req.drop_pending()  # the step launched since computed one more token: not kept
                if req.status is Status.FINISHED:
                    req.finish_reason = "stop"  # it had reached its length too: the stop id wins, as in _append
                else:
                    self.scheduler.finish(req, "stop")
            if req.finished:
                req.finish_time = now
            settled.append(req)
        return settled

    def _report(self, progressed: list[Request]) -> list[Request]:
        return self._forget([r for r in progressed if r.finished]) + [r for r in progressed if not r.finished]

    def _append(self, req: Request, token: int, logits: torch.Tensor | None, now: float) -> None:
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.append(token)
        if logits is not None:
            req.logits.append(logits.cpu())
        p = req.params
        reason = None
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(req, reason)
            req.finish_time = now

    def _forget(self, finished: list[Request]) -> list[Request]:
        for req in finished:
            self.requests.pop(req.request_id, None)
        return finished

    # --- observability ------------------------------------------------------------------------

    def trace_gpu(self, on: bool) -> None:
        """Record two CUDA events around every step's launches from now on (on=True), or stop and drop
        them. A benchmark's tool: whether steps are bound by the GPU or by the host (gpu_step_times)."""
        if on and self.runner.device.type != "cuda":
            raise ConfigError("trace_gpu needs a CUDA engine; CPU steps have no device timeline to read")
        self._gpu_trace = [] if on else None

    def gpu_step_times(self) -> list[tuple[int, float, float]]:
        """(step, GPU start in ms from the first traced step's, GPU ms of the step's launches) per traced
        step. Waits for the GPU: call it between runs, not on the engine's hot path."""
        trace = self._gpu_trace or []
        if not trace:
            return []
        trace[-1][2].synchronize()
        first = trace[0][1]
        return [(step, first.elapsed_time(a), a.elapsed_time(b)) for step, a, b in trace]

    def stats(self) -> dict[str, object]:
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks,
            "adapters": self.cache.stats(),
        }

    def close(self) -> None:
        self.cache.close()


def _make_source(adapters: Path | str | dict[str, Path] | AdapterSource | None, latency_s: float) -> AdapterSource:
    if adapters is None:
        return DirectorySource({}, latency_s)
    from lorascope.adapters.source import SYNTHETIC_PREFIX, SyntheticSource

    if isinstance(adapters, str) and adapters.startswith(SYNTHETIC_PREFIX):
        return SyntheticSource.parse(adapters, default_latency_s=latency_s)  # the spec's LATENCY_MS wins
    if isinstance(adapters, (str, Path)):
        return DirectorySource.from_root(Path(adapters), latency_s)
    if isinstance(adapters, dict):
        return DirectorySource({k: Path(v) for k, v in adapters.items()}, latency_s)
    if hasattr(adapters, "load"):
        return adapters
    raise ConfigError(f"adapters must be a directory, a synthetic:COUNT[:RANK[:LATENCY_MS[:SEED]]] spec, a {{name: path}} dict or an AdapterSource, got {type(adapters).__name__}")
