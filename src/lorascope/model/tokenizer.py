"""Tokenizers: a built-in byte-level one for presets (no model hub), or a directory's tokenizer.json.

The built-in tokenizer is a real Hugging Face `tokenizers` BPE with the 256 byte symbols and no
merges, so `tokenizer.json` written by `model save` loads unchanged in transformers and vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
BUILTIN_VOCAB_SIZE = BYTE_VOCAB + len(SPECIAL_TOKENS)
BOS_ID = BYTE_VOCAB
EOS_ID = BYTE_VOCAB + 1
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer emits)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)


def _byte_of(symbol: str) -> int:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    code = ord(symbol)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def builtin_tokenizer(vocab_size: int = BUILTIN_VOCAB_SIZE, bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> Tokenizer:
    """Bytes at ids 0-255; BOS, EOS and the two chat markers; reserved specials pad to vocab_size.

    Padding matters: vLLM needs the tokenizer's size to equal the model's vocab.
    """
    if vocab_size < BUILTIN_VOCAB_SIZE or not (min(bos_id, eos_id) >= BYTE_VOCAB) or max(bos_id, eos_id) >= vocab_size:
        raise ValueError(f"cannot lay out a byte tokenizer of {vocab_size} ids with bos={bos_id} eos={eos_id}")
    names = {bos_id: SPECIAL_TOKENS[0], eos_id: SPECIAL_TOKENS[1]}
    free = (i for i in range(BYTE_VOCAB, vocab_size) if i not in names)
    names[next(free)] = SPECIAL_TOKENS[2]
    names[next(free)] = SPECIAL_TOKENS[3]
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [names.get(i, f"<|reserved_{i}|>") for i in range(BYTE_VOCAB, vocab_size)]
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == vocab_size
    return tok


class TextTokenizer:
    """The engine's view of a tokenizer: encode, decode, special ids, and a chat template."""

    def __init__(self, tok: Tokenizer, bos_id: int | None, eos_ids: tuple[int, ...], chat_template: str | None):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @classmethod
    def builtin(cls, vocab_size: int = BUILTIN_VOCAB_SIZE, bos_id: int = BOS_ID, eos_ids: tuple[int, ...] = (EOS_ID,)) -> TextTokenizer:
        return cls(builtin_tokenizer(vocab_size, bos_id, eos_ids[0]), bos_id, eos_ids, CHAT_TEMPLATE)

    @classmethod
    def from_dir(cls, path: Path, bos_id: int | None, eos_ids: tuple[int, ...]) -> TextTokenizer:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        template = None
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            template = json.loads(cfg_file.read_text()).get("chat_template")
        return cls(tok, bos_id, eos_ids, template)

    def save(self, path: Path) -> None:
        self._tok.save(str(path / "tokenizer.json"))
        id_to = self._tok.id_to_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None if self.bos_id is None else id_to(self.bos_id),
            "eos_token": id_to(self.eos_ids[0]) if self.eos_ids else None,
            "model_max_length": 1 << 30,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
