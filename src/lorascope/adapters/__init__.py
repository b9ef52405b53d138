"""LoRA adapters on disk: PEFT's format (read, validate, write) and synthetic adapters for benchmarks."""
