"""The server's incremental detokenizer: streamed pieces join to the whole sequence's decode, a split
UTF-8 character is held back until it completes, and decoders that strip a leading space (SentencePiece's
Metaspace) still get the space between pieces. Real `tokenizers` objects, no stand-ins."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lorascope.model.tokenizer import TextTokenizer
from lorascope.server.generate import Detokenizer

TEXT = "Tenant 42 says: naïve café, 日本語のテキスト, emoji 🚀🙂 and a tab\tend."


def stream(tok: TextTokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    detok, pieces, at = Detokenizer(tok), [], 0
    for size in chunks:
        part = ids[at:at + size]
        at += size
        pieces.append(detok.add(part, final=at >= len(ids)))
    assert at >= len(ids)
    return pieces


def chunkings(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = [[1] * n, [n]]
    for _ in range(5):
        sizes, left = [], n
        while left > 0:
            sizes.append(min(left, rng.randint(1, 5)))
            left -= sizes[-1]
        out.append(sizes)
    return out


def byte_tokenizer(vocab_size: int = 128256) -> TextTokenizer:
    return TextTokenizer.builtin(vocab_size=vocab_size, bos_id=128000, eos_ids=(128001,))


def metaspace_tokenizer() -> TextTokenizer:
    """A word-level tokenizer with SentencePiece's Metaspace: decode strips the first word's space."""
    words = TEXT.replace("\t", " ").split()
    vocab = {"[UNK]": 0, **{f"\u2581{w}": i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return TextTokenizer(tok, None, (), None)


@pytest.mark.parametrize("seed", [0, 1])
def test_byte_level_pieces_join_to_the_full_decode(seed: int) -> None:
    tok = byte_tokenizer()
    ids = tok.encode(TEXT, add_bos=False)
    assert len(ids) > len(TEXT)  # multi-byte characters span several tokens
    for sizes in chunkings(len(ids), seed):
        pieces = stream(tok, ids, sizes)
        assert "".join(pieces) == tok.decode(ids) == TEXT
        assert not any("\ufffd" in p for p in pieces), "a partial character leaked"


def test_a_split_character_is_held_back_until_it_completes() -> None:
    tok = byte_tokenizer()
    rocket = tok.encode("🚀", add_bos=False)
    assert len(rocket) == 4
    detok = Detokenizer(tok)
    assert detok.add(tok.encode("go ", add_bos=False), final=False) == "go "
    assert [detok.add([i], final=False) for i in rocket[:3]] == ["", "", ""]
    assert detok.add(rocket[3:], final=False) == "🚀"


def test_an_incomplete_character_is_flushed_at_the_end() -> None:
    tok = byte_tokenizer()
    partial = tok.encode("ok 🚀", add_bos=False)[:-1]
    pieces = stream(tok, partial, [1] * len(partial))
    assert "".join(pieces) == tok.decode(partial)
    assert pieces[-1].endswith("\ufffd")


def test_random_ids_with_special_tokens_join_to_the_full_decode() -> None:
    tok = byte_tokenizer()
    rng = random.Random(3)
    ids = [rng.choice([rng.randrange(256), rng.randrange(256, 128256)]) for _ in range(400)]
    for sizes in chunkings(len(ids), 3):
        joined = "".join(stream(tok, ids, sizes))
        # bytes that never complete a character decode to U+FFFD mid-stream in the full decode too
        assert joined == tok.decode(ids)


def test_metaspace_decoder_keeps_the_spaces_between_pieces() -> None:
    tok = metaspace_tokenizer()
    ids = tok._tok.encode(TEXT.replace("\t", " "), add_special_tokens=False).ids
    assert 0 not in ids
    full = tok.decode(ids)
    assert full == TEXT.replace("\t", " ")
    assert tok.decode(ids[1:2]) == tok.decode(ids[1:2]).lstrip()  # alone, a word loses its space
    for sizes in chunkings(len(ids), 4):
        assert "".join(stream(tok, ids, sizes)) == full


def test_no_tokenizer_gives_no_text() -> None:
    detok = Detokenizer(None)
    assert detok.add([1, 2, 3], final=True) == ""
