"""Built-in model presets: shapes only; weights are deterministic random (see weights.py)."""

from __future__ import annotations

from lorascope.model.config import ModelConfig
from lorascope.model.tokenizer import BOS_ID, BUILTIN_VOCAB_SIZE, EOS_ID

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelConfig] = {
    # Seconds on 2 CPU cores; llama3 rope scaling, GQA and untied embeddings exercised.
    "tiny": ModelConfig(
        model_type="llama",
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=16384,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, original_max_position_embeddings=1024),
        bos_token_id=BOS_ID,
        eos_token_id=(EOS_ID,),
    ),
    # Qwen2 style: qkv bias, tied embeddings, plain rope.
    "tiny-qwen2": ModelConfig(
        model_type="qwen2",
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=True,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=(EOS_ID,),
    ),
    # Mistral style: sliding-window attention (window small enough for tests to cross it).
    "tiny-mistral": ModelConfig(
        model_type="mistral",
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        sliding_window=48,
        bos_token_id=BOS_ID,
        eos_token_id=(EOS_ID,),
    ),
    # The real Llama-3.1-8B shape (random weights): what the study served.
    "llama-3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE),
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)
