"""lorascope: serve hundreds to tens of thousands of LoRA adapters on one base model, and measure it."""

from lorascope.config import EngineConfig
from lorascope.engine.llm import LLM, Completion
from lorascope.engine.sampling import SamplingParams

__all__ = ["LLM", "Completion", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"
