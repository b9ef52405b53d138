"""ModelConfig: the decoder's shape, read from and written to Hugging Face `config.json` dicts.

One decoder family covers Llama (incl. llama3 rope scaling), Mistral (sliding window) and Qwen2
(qkv bias). Names follow Hugging Face so a saved directory loads in transformers, PEFT and vLLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_MODULES = ATTN_MODULES + MLP_MODULES
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


class ModelConfigError(ValueError):
    """A model config that this decoder cannot run; the message names the field and the fix."""


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported; use one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (the decoder covers Llama, Mistral and Qwen2)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ModelConfigError(
                    f"rope scaling type {kind!r} is not supported; supported: llama3, default"
                )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable linear layer."""
        shapes = {
            "q_proj": (self.hidden_size, self.q_size),
            "k_proj": (self.hidden_size, self.kv_size),
            "v_proj": (self.hidden_size, self.kv_size),
            "o_proj": (self.q_size, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise KeyError(module)
        return shapes[module]

    def num_parameters(self) -> int:
        per_layer = sum(i * o for i, o in map(self.module_shape, LORA_TARGET_MODULES))
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        per_layer += 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_hidden_layers * per_layer + embed + head + self.hidden_size

    # --- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type is None:
            raise ModelConfigError("config.json has no 'model_type'; expected llama, mistral or qwen2")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = d.get("rope_parameters") or {}
            rope_theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
            scaling = d.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = d.get("sliding_window")
            if model_type == "qwen2" and not d.get("use_sliding_window", False):
                window = None
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                sliding_window=None if window is None else int(window),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_ids,
                initializer_range=float(d.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks the field {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        d["hidden_act"] = "silu"
        d["torch_dtype"] = "float32"
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        if self.model_type == "qwen2":
            del d["attention_bias"]  # implied by the architecture
            d["use_sliding_window"] = self.sliding_window is not None
        elif self.model_type == "llama":
            d["mlp_bias"] = False
            del d["sliding_window"]
        if self.rope_scaling is None:
            del d["rope_scaling"]
        return d
