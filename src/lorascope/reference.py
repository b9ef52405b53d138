"""The correctness reference: HF transformers + PEFT running the same weights and adapter directories.

The embedded engine is compared against this. Each request runs alone (batch of one, no padding),
so nothing here depends on batching; decoding is greedy for exactly `max_tokens` tokens (EOS does
not stop it), so the engine and the reference always produce sequences of the same length.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Request = tuple[list[int], str | None]


class ReferenceRequestError(ValueError):
    """A request or adapter the reference cannot run; the message names it and the fix."""


@dataclass(slots=True)
class ReferenceOutput:
    token_ids: list[int]
    logits: torch.Tensor | None  # [n_generated, vocab] float32, the logits that chose each generated token
    margins: list[float]  # top1 - top2 logit margin at each step


def reference_generate(
    model_dir: Path | PreTrainedModel,
    adapters: dict[str, Path],
    requests: list[Request],
    max_tokens: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_logits: bool = True,
) -> list[ReferenceOutput]:
    """Greedy-decode `max_tokens` tokens for each (prompt ids, adapter name or None) request.

    The base model is loaded once; the adapters that requests name are loaded into one PeftModel.
    Requests are run grouped by adapter (fewer switches) and returned in input order.
    """
    _check_requests(adapters, requests, max_tokens)
    AutoModelForCausalLM, PeftModel = _import_hf()

    with torch.inference_mode():
        model: Any
        if isinstance(model_dir, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=dtype).to(device)
        else:  # an HF model already built (e.g. sharing the engine's weights: hf_model_sharing)
            model = model_dir
        model.eval()
        cache_kwarg = _cache_kwarg(model)
        # Only named adapters are loaded: an unused adapter would cost load time and change nothing.
        used = list(dict.fromkeys(name for _, name in requests if name is not None))
        for i, name in enumerate(used):
            if i == 0:
                model = PeftModel.from_pretrained(model, Path(adapters[name]), adapter_name=name)
            else:
                model.load_adapter(Path(adapters[name]), adapter_name=name)
        model.to(device)

        groups: dict[str | None, list[int]] = {}
        for index, (_, name) in enumerate(requests):
            groups.setdefault(name, []).append(index)

        results: list[ReferenceOutput | None] = [None] * len(requests)
        for name, indices in groups.items():
            context: AbstractContextManager[Any]
            if name is None:
                # With no adapter loaded the model is the plain HF model; otherwise bypass LoRA.
                context = model.disable_adapter() if used else nullcontext()
            else:
                try:
                    model.set_adapter(name, inference_mode=True)
                except TypeError:  # peft before 0.18 has no inference_mode (and keeps adapters frozen)
                    model.set_adapter(name)
                context = nullcontext()
            with context:
                for index in indices:
                    results[index] = _greedy(model, requests[index][0], max_tokens, device, keep_logits, cache_kwarg)
    return [r for r in results if r is not None]


def hf_model_sharing(decoder: Any, device: str) -> PreTrainedModel:
    """An HF transformers model whose parameters ARE the given lorascope Decoder's tensors.

    For big shapes (the 8B preset on a GPU) this avoids writing and re-reading the weights: the
    reference runs the very same tensors, by identity, and no second copy stays in memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = decoder.cfg.to_hf_dict()
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    dtype = decoder.model.embed_tokens.weight.dtype
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    state = decoder.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and decoder.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF model and Decoder disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if decoder.cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _cache_kwarg(model: PreTrainedModel) -> str:
    """The forward argument (and output field) holding the KV cache: `cache` from transformers 5.x on.

    `past_key_values` still works there but warns; and passing `cache` to an older transformers would
    land in **kwargs unused, silently decoding without context, so the name is looked up, not assumed.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy(
    model: PreTrainedModel, prompt: list[int], max_tokens: int, device: str, keep_logits: bool, cache_kwarg: str
) -> ReferenceOutput:
    """Greedy decoding with the HF KV cache; the logits are the model's raw output, cast to float32."""
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = None
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    margins: list[float] = []
    for _ in range(max_tokens):
        out = model(input_ids=input_ids, use_cache=True, **{cache_kwarg: cache})
        cache = getattr(out, cache_kwarg)
        step = out.logits[0, -1].float()
        token = int(step.argmax())
        top2 = torch.topk(step, 2).values
        margins.append(float(top2[0] - top2[1]))
        tokens.append(token)
        if keep_logits:
            rows.append(step.cpu())
        input_ids = torch.tensor([[token]], dtype=torch.long, device=device)
    logits = torch.stack(rows) if keep_logits else None
    return ReferenceOutput(tokens, logits, margins)


def _check_requests(adapters: dict[str, Path], requests: list[Request], max_tokens: int) -> None:
    """Fail before loading any weights, naming the offending request."""
    if max_tokens < 1:
        raise ReferenceRequestError(f"max_tokens must be at least 1, got {max_tokens}")
    for index, (prompt, name) in enumerate(requests):
        if not prompt:
            raise ReferenceRequestError(f"request {index} has an empty prompt; give at least one token id (e.g. BOS)")
        if name is not None and name not in adapters:
            known = ", ".join(sorted(adapters)) or "none"
            raise ReferenceRequestError(
                f"request {index} names adapter {name!r}, which is not in adapters (known: {known}); "
                "add its directory to `adapters` or use None for the base model"
            )
    for name in {name for _, name in requests if name is not None}:
        if not (Path(adapters[name]) / "adapter_config.json").is_file():
            raise ReferenceRequestError(
                f"adapter {name!r}: {adapters[name]} has no adapter_config.json; expected a PEFT adapter directory"
            )


def _import_hf() -> tuple[Any, Any]:
    """transformers and peft are test extras, so import them only when a reference is computed."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(
            f"the reference needs transformers and peft ({e}); install them with `pip install lorascope[test]`"
        ) from e
    return AutoModelForCausalLM, PeftModel
