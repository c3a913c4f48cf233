"""The fast tokenizer backend (tokenizers + jinja2) against transformers' AutoTokenizer, which it stands in for."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hybrid_jax import checkpoint
from hybrid_jax.tokenizer import IncrementalDecoder, Tokenizer, check_fast

# texts the converter's probes do not contain
TEXTS = ["What is the capital of France?", "Write a haiku about the sea.\nThen explain it.",
         "  Ünïcödé  and\tspacing ,  . !", "SELECT * FROM t WHERE x > 3; -- comment", "1+1=2, 2*3=6; 10/4 = 2.5"]
CONVERSATIONS = [
    [{"role": "user", "content": t} for t in TEXTS[:1]],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": TEXTS[1]}],
    [{"role": "user", "content": TEXTS[2]}, {"role": "assistant", "content": TEXTS[3]},
     {"role": "user", "content": TEXTS[4]}],
]


def both(folder):
    rec = checkpoint.tokenizer_record(folder)
    assert rec is not None and rec["backend"] == "tokenizers", rec
    fast, hf = Tokenizer(folder, rec), Tokenizer(folder)
    assert (fast.backend, hf.backend) == ("tokenizers", "transformers")
    return fast, hf


def test_converter_records_the_fast_backend_and_it_equals_transformers_on_smollm2(smollm2_dir):
    fast, hf = both(smollm2_dir)
    assert fast.eos_token_id == hf.eos_token_id == 2
    assert fast.has_chat_template and hf.has_chat_template
    for t in TEXTS:
        assert fast.encode(t, chat=False) == hf.encode(t, chat=False)
        assert fast.encode(t) == hf.encode(t)  # through the chat template
        assert fast.encode(t, system="Be terse.") == hf.encode(t, system="Be terse.")
    for msgs in CONVERSATIONS:
        ids = hf.encode_chat(msgs)
        assert fast.encode_chat(msgs) == ids
        assert fast.decode(ids) == hf.decode(ids)
        assert fast.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    ids = hf.encode("naïve café 🙂 日本", chat=False)
    pieces = [IncrementalDecoder(t) for t in (fast, hf)]
    assert ["".join(d.push(i) for i in ids) for d in pieces] == [hf.decode(ids)] * 2


def test_tiny_sentencepiece_tokenizer_converted_from_hf(tmp_path, tiny_tokenizer_dir):
    from conftest import make_hf_model
    from convert.api import convert
    from convert_fixtures import save_hf

    src = save_hf(make_hf_model("gqa", seed=1), tmp_path / "src", tiny_tokenizer_dir)
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    fast, hf = both(out)
    for t in TEXTS:
        assert fast.encode(t, chat=False) == hf.encode(t, chat=False)
        assert fast.encode(t, chat=False)[0] == 1  # the BOS transformers adds
    assert fast.eos_token_id == hf.eos_token_id == 2


def test_a_template_transformers_finds_elsewhere_keeps_transformers(tmp_path, smollm2_dir):
    """A list of named chat templates is transformers' business: the check says so and names why."""
    d = tmp_path / "tok"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir / f, d / f)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": (smollm2_dir / "chat_template.jinja").read_text()}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    rec = check_fast(d)
    assert rec["backend"] == "transformers" and "chat template" in rec["reason"]
    assert check_fast(tmp_path)["reason"] == "no tokenizer.json"


def test_load_uses_the_fast_backend_without_importing_transformers(smollm2_dir):
    """The point of the fast backend: a chat answer's start-up never imports transformers (~2.4 s on 2 cores)."""
    code = ("import sys, hybrid_jax\n"
            f"e = hybrid_jax.load({str(smollm2_dir)!r}, max_seq_len=64, prefill_buckets=(16,), background_compiles=False)\n"
            "r = hybrid_jax.generate(e, prompt='What is the capital of France?', max_new_tokens=10)\n"
            "print(e.tokenizer.backend, 'transformers' in sys.modules, repr(r.text))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, imported, text = out.stdout.strip().split(" ", 2)
    assert (backend, imported) == ("tokenizers", "False")
    assert "Paris" in text


def test_gguf_tokenizer_is_the_one_autotokenizer_builds(smollm2_gguf, smollm2_dir, tmp_path):
    """The converter builds the GGUF's tokenizer with the class AutoTokenizer picks, skipping AutoTokenizer's
    second full read of the file: the files it writes must be AutoTokenizer's."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).save_pretrained(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert json.loads((smollm2_dir / f).read_text()) == json.loads((tmp_path / f).read_text()) if f.endswith(
            ".json") else (smollm2_dir / f).read_text() == (tmp_path / f).read_text(), f
