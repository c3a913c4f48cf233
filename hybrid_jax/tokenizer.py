"""Thin wrapper over transformers' AutoTokenizer: encode (with the chat template), incremental decode."""
from __future__ import annotations

import os
import threading
from typing import Sequence

# transformers resolves its names lazily: threads importing them at once saw a half-initialised module
_IMPORT_LOCK = threading.Lock()


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with _IMPORT_LOCK:
            from transformers import AutoTokenizer
            self.hf = AutoTokenizer.from_pretrained(self.path)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids of `text`; as a single user turn through the chat template when there is one."""
        if chat and self.has_chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.encode_chat(msgs)
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        out = self.hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a growing token list into text pieces without emitting broken UTF-8 (held back until whole).

    Each push decodes only a short window (the tokens since the last emitted piece plus the piece before
    them, for context such as leading spaces), not the whole list, so the cost per token stays flat.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        new = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if new.endswith("\ufffd") or len(new) <= len(prefix):  # incomplete character, or nothing yet
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new[len(prefix):]
