"""What detokenizing a stream costs the server's event loop, per chunk: the incremental `Detokenizer`
(server/generate.py) against re-decoding the whole sequence per chunk (what it did before session 13).

    PYTHONPATH=src python3 benchmarks/cpu_detokenizer.py [--lengths 128,4096] [--out results.json]

The built-in byte tokenizer at the llama-3.1-8b preset's vocab (128,256), one token per chunk, byte ids
drawn at random (so multi-byte characters split across chunks), ~6,400 tokens per length.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from lorascope.model.tokenizer import TextTokenizer
from lorascope.server.generate import Detokenizer


def full_redecode(tok: TextTokenizer, ids: list[int]) -> str:
    text = ""
    for i in range(1, len(ids) + 1):
        full = tok.decode(ids[:i])
        if full.endswith("\ufffd") and i < len(ids):
            continue
        text = full
    return text


def incremental(tok: TextTokenizer, ids: list[int]) -> str:
    detok = Detokenizer(tok)
    return "".join(detok.add([x], i == len(ids) - 1) for i, x in enumerate(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,4096")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tok = TextTokenizer.builtin(vocab_size=128256, bos_id=128000, eos_ids=(128001,))
    rng = random.Random(0)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        seqs = [[rng.randrange(256) for _ in range(length)] for _ in range(max(1, 6400 // length))]
        row: dict[str, float | int] = {"tokens": length, "requests": len(seqs)}
        for name, fn in (("full_redecode", full_redecode), ("incremental", incremental)):
            start = time.perf_counter()
            texts = [fn(tok, s) for s in seqs]
            row[f"{name}_us_per_chunk"] = (time.perf_counter() - start) / (len(seqs) * length) * 1e6
            assert texts == [tok.decode(s) for s in seqs], name
        rows.append(row)
        print(f"T={length}: full re-decode {row['full_redecode_us_per_chunk']:.1f} us a chunk, "
              f"incremental {row['incremental_us_per_chunk']:.1f} us a chunk", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
