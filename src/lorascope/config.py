"""EngineConfig: every knob of the embedded engine, with vLLM's names and meanings, validated once."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("fair", "vllm")
EVICTIONS = ("lru", "fifo")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A knob set to a value the engine cannot run with; the message names the knob and the fix."""


@dataclass(slots=True)
class EngineConfig:
    model: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    # LoRA knobs (vLLM's names)
    max_loras: int = 8
    max_cpu_loras: int | None = None  # None: same as max_loras, as in vLLM
    max_lora_rank: int = 16
    eviction: str = "lru"
    lora_target_modules: tuple[str, ...] | None = None  # slots are allocated for these; None: all
    adapter_load_latency_s: float = 0.0  # injected per disk load (stands in for remote storage)
    # batching and memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_gb, capped at max_num_seqs full sequences
    kv_cache_gb: float | None = None  # None: 0.5 GiB on CPU, 90% of free memory on CUDA
    # scheduling
    policy: str = "fair"
    # fair (policies.py): a request waiting W steps borrows a slot for its first step; one parked
    # P steps takes the slot of an adapter that has held it for Q steps
    fair_max_wait_steps: int = 16
    fair_max_park_steps: int = 256
    fair_quantum_steps: int = 64
    prefetch_lookahead: int = 64
    loader_threads: int = 2
    # CUDA: decode steps replay CUDA graphs per batch-size bucket unless this is set (vLLM's name)
    enforce_eager: bool = False
    # pipelined steps: the host schedules and launches step n+1 while the device runs step n (greedy
    # steps; engine.py). None: on for CUDA, off on the CPU (where nothing runs beside the host)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in (
            "max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens", "block_size",
            "fair_max_wait_steps", "fair_max_park_steps", "fair_quantum_steps", "loader_threads",
        ):
            positive(name)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        positive("max_cpu_loras")
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                "every adapter on the device is also held on the host"
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.eviction not in EVICTIONS:
            raise ConfigError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lora_target_modules is not None:
            from lorascope.model.config import LORA_TARGET_MODULES

            unknown = set(self.lora_target_modules) - set(LORA_TARGET_MODULES)
            if unknown:
                raise ConfigError(f"lora_target_modules has unknown modules {sorted(unknown)}; known: {LORA_TARGET_MODULES}")
        if self.num_kv_blocks is not None:
            positive("num_kv_blocks")
        if self.max_model_len is not None:
            positive("max_model_len")
