"""Model sources: a preset with deterministic random weights, or a local Hugging Face directory;
and `save`, which writes any model as such a directory (config.json, safetensors, tokenizer)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorascope.model.config import ModelConfig, ModelConfigError
from lorascope.model.decoder import Decoder
from lorascope.model.presets import PRESETS
from lorascope.model.tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    name: str
    cfg: ModelConfig
    model: Decoder
    tokenizer: TextTokenizer | None


def resolve_config(source: str) -> ModelConfig:
    """The ModelConfig of a preset name or a Hugging Face directory, without loading weights."""
    if source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ModelConfigError(
            f"model {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory "
            "with config.json; write one with `lorascope model save PRESET DIR`"
        )
    return ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))


def load_model(source: str, dtype: str = "float32", device: str = "cpu", max_len: int | None = None, seed: int = 0) -> LoadedModel:
    cfg = resolve_config(source)
    torch_dtype = DTYPES[dtype]
    max_len = max_len or cfg.max_position_embeddings
    with torch.device("meta"):
        model = Decoder(cfg, max_len)
    model = model.to_empty(device=device)
    model.model.rotary.materialize(torch.device(device))
    if source in PRESETS:
        _init_random(model, cfg, torch_dtype, torch.device(device), seed)
        tokenizer = TextTokenizer.builtin(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    else:
        _load_safetensors(model, Path(source), torch_dtype)
        path = Path(source)
        tokenizer = TextTokenizer.from_dir(path, cfg.bos_token_id, cfg.eos_token_id) if (path / "tokenizer.json").exists() else None
    model.eval().requires_grad_(False)
    name = source if source in PRESETS else Path(source).name
    return LoadedModel(name, cfg, model, tokenizer)


def init_std(cfg: ModelConfig, name: str) -> float:
    """The std a random weight is drawn with (`name`: a parameter or module name): Hugging Face's
    rule, N(0, initializer_range) for every matrix.

    Tried and measured (benchmarks/RESULTS.md): a better-conditioned init (untied embeddings at
    std 1, output projections scaled by 1/sqrt(2L)) brings bf16 closer to fp32 on the 8B shape but
    makes the base model nearly a bigram model on which adapters barely move the logits (0.3-0.8%
    on `tiny`), which would blind every adapter-correctness check; so the plain rule stays.
    """
    return cfg.initializer_range


def _seed_for(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**63)


@torch.no_grad()
def _init_random(model: Decoder, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> None:
    """Each tensor from its own generator (seeded by its name), so the result ignores init order.

    Drawn in float32 and cast, so a bf16 model holds the float32 model's weights, rounded.
    """
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data = torch.ones(param.shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(_seed_for(name, seed))
        values = torch.empty(param.shape, dtype=torch.float32, device=device)
        if name.endswith(".bias"):
            values.uniform_(-0.1, 0.1, generator=gen)
        else:
            values.normal_(0.0, init_std(cfg, name), generator=gen)
        param.data = values.to(dtype)


def _load_safetensors(model: Decoder, path: Path, dtype: torch.dtype) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"no *.safetensors file in {path}")
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key not in params:
                    if key == "lm_head.weight" and model.lm_head is None:
                        continue  # a tied model saved with an explicit head
                    raise ModelConfigError(f"{file.name}: unexpected tensor {key!r} for a {model.cfg.model_type} model")
                tensor = f.get_tensor(key)
                param = params[key]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ModelConfigError(
                        f"{file.name}: tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(param.shape)}"
                    )
                param.data = tensor.to(device=param.device, dtype=dtype)
                seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelConfigError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def save_model(loaded: LoadedModel, out: Path, shard_bytes: int = 4 << 30) -> None:
    """Write config.json, model*.safetensors (with an index when sharded) and the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(loaded.cfg.to_hf_dict(), indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save(out)
