"""Encode (with the chat template) and incremental decode.

Two backends with one interface:
- the `tokenizers` library on tokenizer.json plus jinja2 for the chat template, rendered as transformers renders
  it. Importing transformers alone takes ~2.4 s of a ~3 s CPU start, so this is used where the converter checked
  that it gives transformers' ids and text on this tokenizer (config.json's "tokenizer" record);
- transformers' AutoTokenizer everywhere else (a checkpoint converted before the check, tokenizer.model only, or
  one where the two differ).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Sequence

# transformers resolves its names lazily: threads importing them at once saw a half-initialised module
_IMPORT_LOCK = threading.Lock()

RECORD_KEY = "tokenizer"  # config.json: {"backend": "tokenizers", "special_tokens": {...}, "eos_token_id": N}
BACKEND_FAST = "tokenizers"

# what the converter's check encodes, renders and decodes with both backends: spaces, newlines, digits,
# punctuation (transformers' clean-up of " ." etc.), accents, CJK, emoji, and special tokens written in the text
PROBES = (
    "Hello, world! What's the capital of France?",
    " leading space and  double  spaces\n\nnew lines\ttabs",
    "don't won't I'm you're it's ... a , b . c ? d !",
    "Numbers 12345 678.90 -1e-5 0x1F",
    "naïve café résumé — “quotes” ‘single’",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀 and symbols ∑∫√ ©®",
    "code: def f(x):\n    return x ** 2  # square",
)


class Tokenizer:
    def __init__(self, path: str | os.PathLike, record: dict | None = None):
        """`record`: the converter's check (config.json's "tokenizer"); without one, transformers is used."""
        self.path = str(path)
        self.hf = None
        if record and record.get("backend") == BACKEND_FAST:
            self._impl = _Fast(Path(path), record)
        else:
            with _IMPORT_LOCK:
                from transformers import AutoTokenizer
                self.hf = AutoTokenizer.from_pretrained(self.path)
            self._impl = _HF(self.hf)

    @property
    def backend(self) -> str:
        return "transformers" if self.hf is not None else BACKEND_FAST

    @property
    def has_chat_template(self) -> bool:
        return bool(self._impl.chat_template)

    @property
    def eos_token_id(self) -> int | None:
        return self._impl.eos_token_id

    def encode(self, text: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids of `text`; as a single user turn through the chat template when there is one."""
        if chat and self.has_chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.encode_chat(msgs)
        return self._impl.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return self._impl.encode(self._impl.render(list(messages)), add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._impl.decode(list(ids), skip_special_tokens)


class _HF:
    def __init__(self, hf):
        self.hf = hf
        self.chat_template = getattr(hf, "chat_template", None)
        self.eos_token_id = hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [int(t) for t in self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]]

    def render(self, messages: list[dict]) -> str:
        return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def decode(self, ids: list[int], skip: bool) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip)


def chat_template_text(path: Path) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja, else tokenizer_config.json's string."""
    f = path / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    t = cfg.get("chat_template")
    return t if isinstance(t, str) else None  # a list of named templates is left to transformers


class _Fast:
    def __init__(self, path: Path, record: dict):
        from tokenizers import Tokenizer as RustTokenizer

        self.tk = RustTokenizer.from_file(str(path / "tokenizer.json"))
        self.special = dict(record.get("special_tokens") or {})
        self.eos_token_id = record.get("eos_token_id")
        self.chat_template = chat_template_text(path)
        self._compiled = None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def render(self, messages: list[dict]) -> str:
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=True, **self.special)

    def decode(self, ids: list[int], skip: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip)


def _compile(template: str):
    """The template in the sandbox and with the helpers transformers gives chat templates."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def check_fast(path: str | os.PathLike) -> dict:
    """Compare the fast backend with transformers on this tokenizer folder; the record to store in config.json.

    {"backend": "tokenizers", ...} when every probe gives the same ids and text, else {"backend": "transformers",
    "reason": ...}. Run by the converter, which has transformers loaded anyway.
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return {"backend": "transformers", "reason": "no tokenizer.json"}
    try:
        hf = Tokenizer(path)
        special = {k: str(v) for k, v in hf.hf.special_tokens_map.items() if isinstance(v, str)}
        record = {"backend": BACKEND_FAST, "special_tokens": special, "eos_token_id": hf.eos_token_id}
        fast = Tokenizer(path, record)
    except Exception as e:  # the fast backend cannot even load it: transformers it is
        return {"backend": "transformers", "reason": f"{type(e).__name__}: {e}"}

    def differs() -> str | None:
        if (fast._impl.chat_template or None) != (hf._impl.chat_template or None):
            return "the chat template is not found where transformers finds it"
        for text in PROBES:
            for special_tokens in (True, False):
                a, b = hf._impl.encode(text, special_tokens), fast._impl.encode(text, special_tokens)
                if a != b:
                    return f"encode({text!r}) differs"
                for skip in (True, False):
                    if hf.decode(a, skip) != fast.decode(a, skip):
                        return f"decode of {text!r} differs"
            if hf.has_chat_template:
                convs = ([{"role": "user", "content": text}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text},
                          {"role": "assistant", "content": "OK."}, {"role": "user", "content": text}])
                for msgs in convs:
                    ids = hf.encode_chat(msgs)
                    if ids != fast.encode_chat(msgs):
                        return f"the chat template's ids for {text!r} differ"
                    if hf.decode(ids, True) != fast.decode(ids, True) or hf.decode(ids, False) != fast.decode(ids, False):
                        return f"decode of the chat for {text!r} differs"
        return None

    try:
        why = differs()
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    return {"backend": "transformers", "reason": why} if why else record


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
