"""What every route needs: the engine, the served name, and the error type routes raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.engine.async_engine import AsyncLLMEngine
from lorascope.server.metrics import ServerMetrics


class ApiError(Exception):
    """An error with its HTTP status; the app turns it into OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


@dataclass(slots=True)
class ServerState:
    engine: AsyncLLMEngine
    served_model_name: str
    api_key: str | None
    allowed_adapter_root: Path | None
    enable_runtime_lora: bool
    metrics: ServerMetrics
    created: int
    chat_template: Any = None  # a compiled jinja2 template, or None when the model has none
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve_model(self, model: str) -> str | None:
        """The adapter a `model` field selects (None: the base model); 404 for a name we do not serve."""
        if model == self.served_model_name:
            return None
        if self.engine.engine.source.has(model):
            return model
        raise ApiError(404, f"The model `{model}` does not exist; GET /v1/models lists the base model and its adapters",
                       "NotFoundError", "model")

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len
