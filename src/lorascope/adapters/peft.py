"""PEFT LoRA directories: write PEFT's exact on-disk format, and read + validate any PEFT LoRA
directory into the engine's HostAdapter layout (A [r, in], B [out, r] per layer and module).

Reading rejects, with a message that names the adapter, the field or tensor and the fix, everything
the engine would otherwise serve wrongly: features it does not implement, modules it cannot adapt,
shapes of another base model, and non-finite weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorascope.model.config import ATTN_MODULES, LORA_TARGET_MODULES, ModelConfig
from lorascope.model.lora import HostAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose LoraConfig.save_pretrained keys we mirror
# What PEFT 0.21's LoraConfig.save_pretrained writes for a plain inference LoRA, besides r, lora_alpha,
# target_modules, use_rslora and the base model; the nulls are features and bookkeeping we never use.
_PEFT_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys((
        "alora_invocation_tokens", "arrow_config", "auto_mapping", "corda_config", "eva_config", "exclude_modules",
        "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform", "lora_ga_config",
        "megatron_config", "modules_to_save", "monteclora_config", "revision", "target_parameters",
        "trainable_token_indices", "use_bdlora", "velora_config",
    )),
    "alpha_pattern": {}, "bias": "none", "ensure_weight_tying": False, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "loftq_config": {}, "lora_bias": False, "lora_dropout": 0.0, "megatron_core": "megatron.core",
    "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "rank_pattern": {},
    "task_type": "CAUSAL_LM", "use_dora": False, "use_qalora": False,
}
_PARENT = {m: "self_attn" if m in ATTN_MODULES else "mlp" for m in LORA_TARGET_MODULES}
# PEFT drops the adapter name when saving, but some tools keep it (`lora_A.default.weight`).
_KEY_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight")
_MODULE_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
_CONVERT_BIN = (
    "python -c \"import torch; from safetensors.torch import save_file; "
    "sd = torch.load('adapter_model.bin', weights_only=True); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'adapter_model.safetensors', metadata={'format': 'pt'})\""
)
# Config keys whose non-default value changes what the adapter computes, and lorascope does not implement.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA adds a magnitude vector; merge it into the base or retrain as plain LoRA"),
    "modules_to_save": (None, "full copies of extra modules are not served; retrain without modules_to_save"),
    "bias": ("none", "trained biases are not served; retrain with bias='none'"),
    "lora_bias": (False, "a bias on lora_B is not served; retrain with lora_bias=False"),
    "fan_in_fan_out": (False, "transposed (Conv1D-style) weights are not served; save with fan_in_fan_out=False"),
    "rank_pattern": ({}, "per-module ranks are not served; retrain with one r for all modules"),
    "alpha_pattern": ({}, "per-module alphas are not served; retrain with one lora_alpha for all modules"),
    "use_qalora": (False, "QA-LoRA pooling is not served; retrain with use_qalora=False"),
    "use_bdlora": (None, "block-diagonal LoRA is not served; retrain as plain LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) is not served; retrain as plain LoRA"),
    "target_parameters": (None, "LoRA on raw parameters is not served; target modules instead"),
    "trainable_token_indices": (None, "trainable tokens are not served; retrain without trainable_token_indices"),
    "layer_replication": (None, "layer replication is not served; retrain without layer_replication"),
}


class AdapterError(ValueError):
    """An adapter the engine cannot serve; the message names the adapter, the field or tensor, and the fix."""


def peft_key(layer: int, module: str, which: str) -> str:
    """PEFT's safetensors key for lora_A / lora_B (`which` is "A" or "B") of one layer's module."""
    return f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}.lora_{which}.weight"


def peft_config_dict(
    rank: int, alpha: float, targets: list[str], base_model_name: str, use_rslora: bool = False
) -> dict[str, Any]:
    """The adapter_config.json PEFT 0.21's LoraConfig.save_pretrained writes for a plain inference LoRA."""
    return {
        **_PEFT_DEFAULTS,
        "base_model_name_or_path": base_model_name,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "r": rank,
        "target_modules": sorted(set(targets)),  # PEFT keeps a set; sorted keeps our files reproducible
        "use_rslora": use_rslora,
    }


def write_peft_adapter(
    out_dir: Path,
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    targets: list[str],
    base_model_name: str,
    use_rslora: bool = False,
) -> None:
    """Write a PEFT LoRA directory; `weights` maps (layer, module) to (A [rank, in], B [out, rank])."""
    ctx = f"adapter at {out_dir}"
    if rank < 1:
        raise AdapterError(f"{ctx}: rank {rank} is invalid; use a rank >= 1")
    unknown = sorted(set(targets) - set(LORA_TARGET_MODULES))
    if unknown or not targets:
        raise AdapterError(f"{ctx}: targets {unknown or targets} are not LoRA targets; use some of {', '.join(LORA_TARGET_MODULES)}")
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), (a, b) in weights.items():
        if module not in targets:
            raise AdapterError(f"{ctx}: weights for layer {layer} {module!r}, which is not in targets {targets}; add it to targets")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{ctx}: layer {layer} {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"expected A [{rank}, in] and B [out, {rank}] for rank {rank}"
            )
        tensors[peft_key(layer, module, "A")] = a.detach().contiguous().cpu()
        tensors[peft_key(layer, module, "B")] = b.detach().contiguous().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    # The config goes last: a directory only counts as an adapter (list_adapter_dirs) once it is complete.
    config = peft_config_dict(rank, alpha, targets, base_model_name, use_rslora)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def list_adapter_dirs(root: Path) -> dict[str, Path]:
    """The immediate subdirectories of `root` that hold an adapter_config.json, by name, sorted."""
    if not root.is_dir():
        raise AdapterError(f"adapter root {root} is not a directory; pass a directory whose subdirectories are PEFT adapters")
    found = [p for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()]
    return {p.name: p for p in sorted(found, key=lambda p: p.name)}


def _module_names(cfg: ModelConfig) -> list[str]:
    """The names of the Hugging Face model's modules, as PEFT matches target_modules against them."""
    names = ["model", "model.embed_tokens", "model.layers"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
        names += [f"{p}.{_PARENT[m]}.{m}" for m in LORA_TARGET_MODULES]
    return [*names, "model.norm", "model.rotary_emb", "lm_head"]


def _lora_pair(name: str) -> tuple[int, str] | None:
    """(layer, module) of a LoRA-targetable module name, else None."""
    m = _MODULE_RE.fullmatch(name)
    return (int(m.group(1)), m.group(3)) if m is not None and m.group(3) in _PARENT else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_names(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


# adapter_config.json fields read here: (PEFT's default, type test, what the test wants)
_FIELDS: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    "r": (8, lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "lora_alpha": (8, lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "target_modules": (["q_proj", "v_proj"], _is_names, "a list of module names or a regex string"),  # PEFT's llama/qwen2 default
    "exclude_modules": ([], _is_names, "a list of module names or a regex string"),
    "layers_to_transform": ([], lambda v: _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))), "an int or a list of ints"),
    "layers_pattern": ([], _is_names, "a string or a list of strings"),
}


def _field(conf: dict[str, Any], key: str, ctx: str) -> Any:
    default, ok, kind = _FIELDS[key]
    value = conf.get(key)
    if value is None:
        return default
    if not ok(value):
        raise AdapterError(f"{ctx}: {key}={value!r} in {CONFIG_FILE} is not {kind}; fix {key}")
    return value


def _regex(pattern: str, field: str, ctx: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{ctx}: {field} regex {pattern!r} is invalid ({e}); fix the pattern in {CONFIG_FILE}") from None


def _layer_filter(conf: dict[str, Any], ctx: str) -> Callable[[str], bool]:
    """PEFT's layers_to_transform / layers_pattern test of a module name (check_target_module_exists)."""
    indexes, pattern = _field(conf, "layers_to_transform", ctx), _field(conf, "layers_pattern", ctx)
    if indexes == []:
        return lambda key: True
    if not pattern:
        regexes = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    else:
        patterns = [pattern] if isinstance(pattern, str) else pattern
        regexes = [_regex(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern", ctx) for p in patterns]

    def selected(key: str) -> bool:
        match = next((m for m in (r.match(key) for r in regexes) if m is not None), None)
        if match is None:
            return False
        return int(match.group("idx")) in ([indexes] if isinstance(indexes, int) else indexes)

    return selected


def _resolve_targets(conf: dict[str, Any], cfg: ModelConfig, ctx: str) -> set[tuple[int, str]]:
    """The (layer, module) pairs the config adapts, matched the way PEFT matches module names."""
    names = all_names = _module_names(cfg)
    targets, excluded = _field(conf, "target_modules", ctx), _field(conf, "exclude_modules", ctx)
    selected = _layer_filter(conf, ctx)
    if isinstance(excluded, str):
        names = [n for n in names if not _regex(excluded, "exclude_modules", ctx).fullmatch(n)]
    else:
        names = [n for n in names if n not in excluded and not any(n.endswith(f".{e}") for e in excluded)]
    if isinstance(targets, str) and conf.get("layers_to_transform") not in (None, []):
        raise AdapterError(
            f"{ctx}: layers_to_transform is set while target_modules is the string {targets!r}; PEFT rejects that too. "
            "List the module names in target_modules, or fold the layer choice into the regex"
        )
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = [n for n in names if _lora_pair(n)]  # PEFT skips lm_head, the output embedding
    if isinstance(targets, str):
        regex = _regex(targets, "target_modules", ctx)
        matched = [n for n in names if regex.fullmatch(n)]
    else:
        for t in targets:
            if not any(n == t or n.endswith(f".{t}") for n in all_names):
                raise AdapterError(
                    f"{ctx}: target_modules entry {t!r} names no module of this {cfg.model_type} model "
                    f"(LoRA targets: {', '.join(LORA_TARGET_MODULES)}); the adapter was probably trained for another base model"
                )
        # As in PEFT, a full module name matches outright; a suffix match is subject to layers_to_transform.
        matched = [n for n in names if n in targets or (any(n.endswith(f".{t}") for t in targets) and selected(n))]
    if not matched:
        raise AdapterError(
            f"{ctx}: target_modules {targets!r} (with exclude_modules and layers_to_transform) selects no module of this "
            f"{cfg.model_type} model ({cfg.num_hidden_layers} layers, names like model.layers.0.self_attn.q_proj); "
            "the adapter was probably trained for another base model, or those fields need fixing"
        )
    pairs = {n: _lora_pair(n) for n in matched}
    bad = [n for n, pair in pairs.items() if pair is None]
    if bad:
        raise AdapterError(
            f"{ctx}: target_modules matches {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}, which is unsupported: "
            f"only {', '.join(LORA_TARGET_MODULES)} can be adapted; retrain with target_modules limited to those"
        )
    return {pair for pair in pairs.values() if pair is not None}


def _read_config(path: Path, ctx: str) -> dict[str, Any]:
    if not path.is_dir():
        raise AdapterError(f"{ctx}: directory not found; pass a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{ctx}: {CONFIG_FILE} is missing; save the adapter with PEFT's save_pretrained")
    try:
        conf = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{ctx}: {CONFIG_FILE} is not valid JSON ({e}); re-save the adapter with PEFT") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"{ctx}: {CONFIG_FILE} holds a {type(conf).__name__}, not an object; re-save the adapter with PEFT")
    if not (path / WEIGHTS_FILE).is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{ctx}: only adapter_model.bin is present, and the pickle format is not supported; "
                f"convert it to {WEIGHTS_FILE} in that directory with: {_CONVERT_BIN}"
            )
        raise AdapterError(f"{ctx}: {WEIGHTS_FILE} is missing; save the adapter with PEFT's save_pretrained")
    if conf.get("peft_type") != "LORA":
        raise AdapterError(f"{ctx}: peft_type is {conf.get('peft_type')!r}, not 'LORA'; only LoRA adapters are served")
    for key, (default, fix) in _UNSUPPORTED.items():
        value = conf.get(key, default)
        if value != default and value not in (None, False, {}, []):
            raise AdapterError(f"{ctx}: {key}={value!r} in {CONFIG_FILE} is unsupported; {fix}")
    return conf


def _load_tensors(path: Path, ctx: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{ctx}: {WEIGHTS_FILE} cannot be read as safetensors ({e}); re-save the adapter with PEFT") from None


def read_peft_adapter(
    path: Path, cfg: ModelConfig, max_lora_rank: int, name: str | None = None, dtype: torch.dtype = torch.float32
) -> HostAdapter:
    """Read and validate a PEFT LoRA directory for the base model `cfg`; see the module docstring."""
    name = name or path.name
    ctx = f"adapter {name!r} ({path})"
    conf = _read_config(path, ctx)
    r, alpha = _field(conf, "r", ctx), float(_field(conf, "lora_alpha", ctx))
    if r > max_lora_rank:
        raise AdapterError(f"{ctx}: r={r} is above max_lora_rank={max_lora_rank}; raise --max-lora-rank to at least {r}")
    expected = _resolve_targets(conf, cfg, ctx)
    base = f"this base model ({cfg.model_type}, hidden_size {cfg.hidden_size}, {cfg.num_hidden_layers} layers)"

    found: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in _load_tensors(path, ctx).items():
        m = _KEY_RE.fullmatch(key)
        if m is None or m.group(3) not in LORA_TARGET_MODULES or _PARENT[m.group(3)] != m.group(2):
            raise AdapterError(
                f"{ctx}: tensor {key!r} is not a LoRA weight of q/k/v/o/gate/up/down_proj (expected keys like "
                f"{peft_key(0, 'q_proj', 'A')!r}); remove it or re-save the adapter with PEFT"
            )
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if layer >= cfg.num_hidden_layers:
            raise AdapterError(
                f"{ctx}: tensor {key!r} names layer {layer}, but {base} has layers 0..{cfg.num_hidden_layers - 1}; "
                "the adapter was probably trained for another base model"
            )
        if (layer, module) not in expected:
            raise AdapterError(
                f"{ctx}: tensor {key!r} is for a module that {CONFIG_FILE}'s target_modules/layers_to_transform do not "
                f"select; add {module!r} to target_modules or remove the tensor"
            )
        if which in found.setdefault((layer, module), {}):
            raise AdapterError(f"{ctx}: tensors {found[layer, module][which][0]!r} and {key!r} are the same weight; keep one")
        found[layer, module][which] = (key, tensor)

    absent = sorted({pair for pair in expected if pair[1] not in {mod for _, mod in found}})
    if absent:
        layer, module = absent[0]
        raise AdapterError(
            f"{ctx}: target module {module!r} is selected by target_modules but {WEIGHTS_FILE} has no tensors for it "
            f"(e.g. {peft_key(layer, module, 'A')!r}); remove it from target_modules or re-save the adapter"
        )
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, module in sorted(expected):
        pair = found.get((layer, module), {})
        for which in "AB":
            if which not in pair:
                raise AdapterError(
                    f"{ctx}: tensor {peft_key(layer, module, which)!r} is missing ({module} is a target at layer {layer}"
                    f"{' and its lora_' + ('B' if which == 'A' else 'A') + ' is present' if pair else ''}); re-save the adapter"
                )
        fan_in, fan_out = cfg.module_shape(module)
        for which, shape in (("A", (r, fan_in)), ("B", (fan_out, r))):
            key, t = pair[which]
            if tuple(t.shape) != shape:
                raise AdapterError(
                    f"{ctx}: tensor {key!r} has shape {list(t.shape)}, expected {list(shape)} for {base} at r={r}; "
                    "the adapter was probably trained for another base model"
                )
            if not t.is_floating_point():
                raise AdapterError(f"{ctx}: tensor {key!r} has dtype {t.dtype}, not a float type; re-save the adapter")
            # max |x| propagates NaN and Inf; in float32 because CPU bf16 isfinite is ~10x slower
            if not bool(t.float().abs().amax().isfinite()):
                raise AdapterError(f"{ctx}: tensor {key!r} holds NaN or Inf values; the adapter is corrupt or diverged in training, retrain or re-export it")
        weights[layer, module] = (pair["A"][1].to(dtype).contiguous(), pair["B"][1].to(dtype).contiguous())

    scale = alpha / math.sqrt(r) if conf.get("use_rslora", False) else alpha / r
    return HostAdapter(name=name, weights=weights, scales=dict.fromkeys({m for _, m in weights}, scale), rank=r)
