"""The OpenAI-compatible wire format (and vLLM's extras), as pydantic models.

This is the only module that uses pydantic: requests are validated here at the edge, then turned
into the engine's dataclasses. Unknown fields are ignored, as OpenAI clients send fields we do not
implement (user, logit_bias, ...); fields we do implement are range-checked so that a bad value is a
400 naming the field, never a crash deeper in.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# torch.Generator.manual_seed takes a signed 64-bit value
MAX_SEED = 2**63 - 1
Finite = Annotated[float, Field(allow_inf_nan=False)]
# adapter names become Prometheus label values joined by commas: keep commas and blanks out
AdapterName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^,\s]+$")]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    """Fields shared by completions and chat (OpenAI's plus vLLM's min_tokens / ignore_eos / top_k)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite = Field(1.0, ge=0.0, le=100.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=2**31 - 1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(..., description="text, or token ids (every engine then sees the same lengths)")


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")


class LoadLoRARequest(_Lenient):
    lora_name: AdapterName
    lora_path: str = Field(..., min_length=1, max_length=4096)


class UnloadLoRARequest(_Lenient):
    lora_name: AdapterName


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] = Field(default_factory=list, description="vLLM-style extension: the generated ids")


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] = Field(default_factory=list)


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "lorascope"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status)).model_dump()


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line naming each bad field (the body's path without FastAPI's leading "body")."""
    parts, first = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        first = first or field
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body", first
