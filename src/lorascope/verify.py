"""The correctness audit behind `lorascope verify`: references, and the classification of answers.

The requests are K prompts (token ids) x (the base model + every adapter): every prompt is asked of
every model, so an answer can be compared with the reference of *each* model for the same prompt.
References are HF transformers + PEFT greedy continuations (`reference.py`), cached beside the
adapters. `verifycmd.py` drives an engine with the same requests; `classify` judges one answer:

- `pass`: equal to its own reference, token by token (or text, where the server returns no ids).
- `wrong_adapter`: an adapter request whose output equals the reference of another adapter, or of
  the base model (the adapter was not applied): `got` names it.
- `contaminated_base`: a base-model request whose output equals an adapter's reference (named).
- `drift`: first differs from its own reference at a step where the reference's top-1/top-2 logit
  margin is at most `drift_tol` x the standard deviation of that step's logits: a near tie that
  numerical noise (batching, kernels, dtype) can flip. Reported with the margin; not a failure.
- `wrong_output`: differs and is none of the above; `got` names the closest reference (longest
  common prefix).
- `error`: the engine failed the request (HTTP status, timeout, malformed answer).

Where two models' references coincide for a prompt, an answer equal to both cannot be told apart:
`ambiguous_pairs` lists them and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorascope.reference import reference_generate

BASE = "(base)"  # the base model's name in results (parentheses: no adapter directory is named so)
STATUSES = ("pass", "drift", "wrong_adapter", "contaminated_base", "wrong_output", "error")
FAILING = frozenset({"wrong_adapter", "contaminated_base", "wrong_output", "error"})
DRIFT_TOL = {"float32": 0.002, "float16": 0.05, "bfloat16": 0.1}  # x the logits' std at that step
CANDIDATES = 5  # prompts tried per prompt kept: the kept ones give every model a different reference
CACHE_DIR = ".lorascope-verify"
CACHE_VERSION = 1
_HASH_ALL_BYTES = 1 << 30  # weights larger than this are fingerprinted by name, size and mtime
_SMALL_MODEL_BYTES = 64 << 20  # references of smaller models run on one CPU thread


@dataclass(slots=True)
class RefSeq:
    """One reference continuation, with what the drift rule needs at each step."""

    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit
    scales: list[float]  # standard deviation of the step's logits (the logit scale)
    runner_up: list[int]  # the second-best token id


@dataclass(slots=True)
class References:
    key: str
    prompts: list[list[int]]
    models: list[str]  # BASE first, then the adapters in name order
    seqs: dict[str, list[RefSeq]]  # model -> one per prompt
    cached: bool = False
    path: Path | None = None


@dataclass(slots=True)
class Answer:
    tokens: list[int] | None = None  # the generated ids, where the server returns them
    text: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Outcome:
    setting: str
    prompt: int
    model: str
    status: str
    got: list[str] = field(default_factory=list)  # the references it equals (or the closest one)
    position: int | None = None  # first step that differs from its own reference
    margin: float | None = None  # the reference's top-1/top-2 logit margin there
    margin_rel: float | None = None  # margin / std of that step's logits
    runner_up: bool | None = None  # the engine chose the reference's second-best token there
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def make_prompts(count: int, length: int, vocab_size: int, special_ids: set[int], seed: int = 0) -> list[list[int]]:
    """`count` distinct token-id prompts of `length` ids, avoiding special ids (deterministic in seed)."""
    pool = [i for i in range(min(vocab_size, 32000)) if i not in special_ids]
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    while len(prompts) < count:
        p = [rng.choice(pool) for _ in range(length)]
        if p not in prompts:
            prompts.append(p)
    return prompts


def fingerprint(
    model_dir: Path, adapters: dict[str, Path], prompts: list[list[int]], tokens: int, dtype: str, device: str
) -> str:
    """The reference cache key: model config and weights, every adapter's files, the plan, the stack."""
    import peft
    import transformers

    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                CACHE_VERSION,
                prompts,
                tokens,
                dtype,
                device,
                transformers.__version__,
                peft.__version__,
                torch.__version__,
            ]
        ).encode()
    )
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    whole = sum(p.stat().st_size for p in files) <= _HASH_ALL_BYTES
    for p in files:
        _hash_file(h, p, whole or p.suffix == ".json")
    for name in sorted(adapters):
        h.update(name.encode())
        for p in sorted(adapters[name].iterdir()):
            if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"):
                _hash_file(h, p, True)
    return h.hexdigest()[:24]


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _hash_file(h: hashlib._Hash, path: Path, content: bool) -> None:
    h.update(path.name.encode())
    if not content:
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def references(
    model_dir: Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    tokens: int,
    dtype: str = "float32",
    device: str = "cpu",
    cache_root: Path | None = None,
    keep: int | None = None,
) -> References:
    """Every (prompt, model) reference, from `cache_root/<key>.json` when present, else computed (and cached).

    With `keep`, only the `keep` prompts (of those given) that tell the models apart best are kept:
    fewest coinciding references first, then the largest smallest margin (fewest near ties).
    """
    key = fingerprint(model_dir, adapters, prompts, tokens, dtype, device) + (f"-k{keep}" if keep else "")
    models = [BASE, *sorted(adapters)]
    path = cache_root / f"{key}.json" if cache_root is not None else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            seqs = {m: [RefSeq(**s) for s in data["seqs"][m]] for m in models}
            return References(key, data["prompts"], models, seqs, cached=True, path=path)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is recomputed and rewritten
    from lorascope.model.weights import DTYPES

    requests = [(p, None if m == BASE else m) for m in models for p in prompts]
    threads = torch.get_num_threads()
    if device == "cpu" and _weights_bytes(model_dir) < _SMALL_MODEL_BYTES:
        # A tiny model's matmuls gain nothing from threads, and on a busy machine the spinning
        # threads cost 10-70x (measured: 32 steps 0.2 s on one thread, 16 s on two, under load).
        torch.set_num_threads(1)
    try:
        outs = reference_generate(model_dir, adapters, requests, tokens, device, DTYPES[dtype], keep_logits=True)
    finally:
        torch.set_num_threads(threads)
    seqs: dict[str, list[RefSeq]] = {m: [] for m in models}
    for (_, name), out in zip(requests, outs, strict=True):
        assert out.logits is not None
        top = torch.topk(out.logits, 2, dim=-1).indices[:, 1]
        seqs[name or BASE].append(RefSeq(out.token_ids, out.margins, out.logits.std(dim=-1).tolist(), top.tolist()))
    refs = References(key, prompts, models, seqs, path=path)
    if keep and keep < len(prompts):
        refs = _best_prompts(refs, keep)
    if path is not None:
        _write_cache(path, refs)
    return refs


def _best_prompts(refs: References, keep: int) -> References:
    def score(k: int) -> tuple[int, float]:
        distinct = len({tuple(refs.seqs[m][k].tokens) for m in refs.models})
        tie = min(
            min(
                m / s if s > 0 else float("inf")
                for m, s in zip(refs.seqs[x][k].margins, refs.seqs[x][k].scales, strict=True)
            )
            for x in refs.models
        )
        return (len(refs.models) - distinct, -tie)

    chosen = sorted(sorted(range(len(refs.prompts)), key=score)[:keep])
    seqs = {m: [v[k] for k in chosen] for m, v in refs.seqs.items()}
    return References(refs.key, [refs.prompts[k] for k in chosen], refs.models, seqs, path=refs.path)


def _write_cache(path: Path, refs: References) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(
            json.dumps(
                {
                    "key": refs.key,
                    "prompts": refs.prompts,
                    "models": refs.models,
                    "seqs": {m: [asdict(s) for s in v] for m, v in refs.seqs.items()},
                }
            )
        )
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only adapter directory: the references are simply not cached


def ambiguous_pairs(refs: References, decode: Callable[[list[int]], str] | None = None) -> list[dict[str, object]]:
    """Per prompt, the groups of models whose references coincide (answers equal to them are ambiguous)."""
    out: list[dict[str, object]] = []
    for k in range(len(refs.prompts)):
        groups: dict[object, list[str]] = {}
        for m in refs.models:
            seq = refs.seqs[m][k].tokens
            groups.setdefault(decode(seq) if decode else tuple(seq), []).append(m)
        out += [{"prompt": k, "models": g} for g in groups.values() if len(g) > 1]
    return out


def classify(
    refs: References,
    setting: str,
    prompt: int,
    model: str,
    answer: Answer,
    drift_tol: float,
    decode: Callable[[list[int]], str] | None = None,
) -> Outcome:
    """Judge one answer against every model's reference for its prompt (rules: module docstring)."""
    out = Outcome(setting, prompt, model, "pass")
    if answer.error is not None or (answer.tokens is None and answer.text is None):
        out.status, out.detail = "error", answer.error or "the answer carried neither token ids nor text"
        return out
    by_text = answer.tokens is None
    if by_text and decode is None:
        raise ValueError("comparing text needs a decode function (the model's tokenizer)")
    got: list[int] | str = answer.text if by_text else answer.tokens  # type: ignore[assignment]

    def seq(m: str) -> list[int] | str:
        tokens = refs.seqs[m][prompt].tokens
        return decode(tokens) if by_text and decode else tokens

    equal = [m for m in refs.models if seq(m) == got]
    if model in equal:
        if len(equal) > 1:
            out.detail = f"its reference coincides with {', '.join(m for m in equal if m != model)}'s (ambiguous)"
        return out
    if equal:
        out.status = "contaminated_base" if model == BASE else "wrong_adapter"
        out.got = equal
        return out
    own = refs.seqs[model][prompt]
    pos = _first_difference(own.tokens, got, decode if by_text else None)
    out.position = pos
    if pos < len(own.margins):
        out.margin = own.margins[pos]
        out.margin_rel = own.margins[pos] / own.scales[pos] if own.scales[pos] > 0 else float("inf")
        if not by_text and pos < len(got):
            out.runner_up = got[pos] == own.runner_up[pos]
    if out.margin_rel is not None and out.margin_rel <= drift_tol:
        out.status = "drift"
        out.detail = f"diverges at step {pos}: reference margin {out.margin:.3g} ({out.margin_rel:.3g} x logit std)"
        return out
    out.status = "wrong_output"

    def shared(m: str) -> tuple[int, bool]:  # the longest common prefix; a tie goes to its own model
        return _first_difference(refs.seqs[m][prompt].tokens, got, decode if by_text else None), m == model

    closest = max(refs.models, key=shared)
    out.got = [closest]
    out.detail = f"diverges at step {pos}; closest reference: {closest}"
    return out


def _first_difference(ref: list[int], got: list[int] | str, decode: Callable[[list[int]], str] | None) -> int:
    """The first step where `got` leaves `ref` (token ids; or text, by decoded prefixes of `ref`)."""
    if isinstance(got, str):
        assert decode is not None
        for i in range(len(ref)):
            if not got.startswith(decode(ref[: i + 1]).rstrip("\ufffd")):
                return i
        return len(ref)
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            return i
    return min(len(ref), len(got))


def verdict(outcomes: list[Outcome]) -> tuple[str, dict[str, int]]:
    """("pass" | "fail", counts per status): any failing status fails the verification."""
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    return ("fail" if any(counts[s] for s in FAILING) else "pass"), counts


def summary_line(outcomes: list[Outcome], settings: int) -> str:
    """One sentence: the verdict, the counts, and the first finding of each failing kind."""
    status, counts = verdict(outcomes)
    parts = [f"{counts[s]} {s.replace('_', ' ')}" for s in STATUSES if counts[s] and s != "pass"]
    line = f"{status.upper()}: {counts['pass']} of {len(outcomes)} answers over {settings} settings equal the reference"
    line += f"; {', '.join(parts)}" if parts else ""
    for kind in ("contaminated_base", "wrong_adapter", "wrong_output", "error"):
        first = next((o for o in outcomes if o.status == kind), None)
        if first is not None:
            if kind == "error":
                what = first.detail[:120]
            elif kind == "wrong_output":
                what = f"an output equal to no reference (closest: {'/'.join(first.got)})"
            else:
                what = f"the output of {'/'.join(first.got)}"
            line += f" (e.g. {first.setting}: {first.model} prompt {first.prompt} gave {what})"
            break
    return line
