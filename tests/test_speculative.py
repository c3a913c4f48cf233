"""Speculative decoding (prompt lookup): proposals, exact acceptance, and generate() with it equal to without."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_params, make_hf_model
from hybrid_jax import speculative
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate, load, speculative_tokens
from hybrid_jax.sampling import make_params


# ---- proposals ---------------------------------------------------------------------------------------

def ref_propose(seq: list[int], k: int, nmin=speculative.NGRAM_MIN, nmax=speculative.NGRAM_MAX) -> list[int] | None:
    """The rule in plain Python: the longest n-gram (nmax down to nmin) ending the sequence that occurs earlier
    with a continuation; its latest occurrence; the k tokens after it. None: no occurrence."""
    L = len(seq)
    for n in range(min(nmax, L), nmin - 1, -1):
        tail = seq[L - n:]
        for e in range(L - 2, n - 2, -1):  # the match ends at e < L - 1
            if seq[e - n + 1:e + 1] == tail:
                return [seq[e + 1 + i] if e + 1 + i < L else None for i in range(k)]
    return None


@pytest.mark.parametrize("seed", range(40))
def test_ngram_proposals_match_the_rule(seed):
    rng = np.random.default_rng(seed)
    S, k = 48, 4
    L = int(rng.integers(1, S - 1))
    seq = rng.integers(0, 6 if seed % 2 else 30, L).tolist()  # small vocabularies repeat, large ones rarely
    hist = np.concatenate([seq, rng.integers(0, 30, S - L)]).astype(np.int32)  # stale rows after the sequence
    got = np.asarray(speculative.ngram_propose(jnp.asarray(hist), jnp.int32(L), k)).tolist()
    want = ref_propose(seq, k)
    if want is None:
        assert got == [seq[-1]] * k
    else:  # past the sequence's end a proposal is whatever the row holds (stale): only the known ones compare
        assert [g for g, w in zip(got, want) if w is not None] == [w for w in want if w is not None]


def test_ngram_proposal_examples():
    hist = jnp.asarray([7, 1, 2, 3, 9, 1, 2, 5, 6, 1, 2, 0, 0, 0, 0, 0], jnp.int32)
    # last 2-gram (1, 2) occurs at 1-2 and 5-6: the latest, followed by 5, 6, 1
    assert np.asarray(speculative.ngram_propose(hist, jnp.int32(11), 3)).tolist() == [5, 6, 1]
    # last 3-gram (9, 1, 2)... at length 7 the sequence ends 9 1 2: only (1, 2)'s earlier match at 1-2 -> 3, 9, 1
    assert np.asarray(speculative.ngram_propose(hist, jnp.int32(7), 3)).tolist() == [3, 9, 1]


# ---- acceptance ---------------------------------------------------------------------------------------

def test_greedy_acceptance_counts_the_leading_matches():
    V = 8
    g = [3, 5, 1, 4, 2]  # argmax of each row
    logits = jax.nn.one_hot(jnp.asarray(g), V) * 5.0
    for props, n in (([3, 5, 1, 4], 5), ([3, 5, 0, 4], 3), ([0, 5, 1, 4], 1), ([3, 0, 1, 4], 2)):
        toks, got = speculative.accept_greedy(logits, jnp.asarray(props, jnp.int32))
        assert int(got) == n and np.asarray(toks).tolist() == g  # emitted: g[:n] (accepted proposals equal g)


@pytest.mark.parametrize("sp", [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8)])
def test_sampled_acceptance_keeps_the_target_distribution(sp):
    """Over 200k keys: the first emitted token has the target's (filtered) distribution at row 0, and, where
    the first proposal was accepted, the second has row 1's. Tolerance: 4 standard errors per token."""
    V, N = 6, 200_000
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, V)) * 1.5, jnp.float32)
    props = jnp.asarray([int(np.argmax(logits[0])), 2], jnp.int32)  # a likely and an arbitrary proposal
    params = make_params(**sp)
    keys = jax.random.split(jax.random.PRNGKey(1), N)
    toks, n = jax.vmap(lambda key: speculative.accept_sample(logits, props, key, params))(keys)
    toks, n = np.asarray(toks), np.asarray(n)

    def target(row):
        from hybrid_jax.sampling import filtered_logits
        s, order = filtered_logits(logits[row], params)
        p = np.zeros(V)
        p[np.asarray(order)] = np.asarray(jax.nn.softmax(s))
        return p

    def check(samples, p):
        freq = np.bincount(samples, minlength=V) / len(samples)
        se = np.sqrt(p * (1 - p) / len(samples)) + 1e-4
        assert np.all(np.abs(freq - p) < 4 * se), (freq, p)

    check(toks[:, 0], target(0))  # emitted first: the accepted proposal, or the residual draw
    acc = n >= 2
    assert 0.05 < acc.mean() < 0.95
    check(toks[acc, 1], target(1))


# ---- generate with it, against without ------------------------------------------------------------

@pytest.fixture(scope="module", params=["gqa", "mha"])
def engines(request):
    m = make_hf_model(request.param, seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    plain = Engine(cfg, p, max_seq_len=128, use_disk_cache=False)
    spec = Engine(cfg, p, max_seq_len=128, use_disk_cache=False, speculative="ngram", num_speculative_tokens=4)
    spec.spec_break_even = 0.0  # speculate throughout: these tests check exactness, not the back-off
    yield plain, spec
    plain.close()
    spec.close()


PROMPTS = {"repeats": [5, 17, 33, 90, 12, 7] * 4, "plain": list(range(3, 40, 2))}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_is_the_output_without_speculation(engines, prompt):
    plain, spec = engines
    ids = PROMPTS[prompt]
    for n in (1, 2, 7, 60):  # lengths that end inside a verify step's tokens, and a long run
        a = generate(plain, ids, max_new_tokens=n, ignore_eos=True)
        b = generate(spec, ids, max_new_tokens=n, ignore_eos=True)
        assert b.token_ids == a.token_ids, (n, b.timings)
    assert b.timings.verify_steps > 0 and b.timings.accepted > 0  # a tiny random model repeats itself
    assert b.timings.proposed == 4 * b.timings.verify_steps
    assert len(b.timings.itl_s) == len(b.token_ids) - 1
    streamed = [p.token_id for p in generate(spec, ids, max_new_tokens=60, ignore_eos=True, stream=True)]
    assert streamed == a.token_ids
    off = generate(spec, ids, max_new_tokens=60, ignore_eos=True, speculative=False)
    assert off.token_ids == a.token_ids and off.timings.verify_steps == 0


def test_a_stop_inside_accepted_tokens_cuts_there(engines):
    plain, spec = engines
    ids = PROMPTS["repeats"]
    full = generate(plain, ids, max_new_tokens=40, ignore_eos=True).token_ids
    stop_tok = full[9]
    cut = full.index(stop_tok)
    a = generate(plain, ids, max_new_tokens=40, stop_token_ids=[stop_tok], ignore_eos=True)
    b = generate(spec, ids, max_new_tokens=40, stop_token_ids=[stop_tok], ignore_eos=True)
    assert b.token_ids == a.token_ids == full[:cut] and b.finish_reason == a.finish_reason == "stop"
    # the next request starts clean after a stop mid-step
    assert generate(spec, ids, max_new_tokens=40, ignore_eos=True).token_ids == full


def test_sampling_with_speculation(engines):
    plain, spec = engines
    ids = PROMPTS["repeats"]
    greedy = generate(plain, ids, max_new_tokens=30, ignore_eos=True).token_ids
    assert generate(spec, ids, max_new_tokens=30, temperature=1.0, top_k=1, seed=3, ignore_eos=True).token_ids == greedy
    r = generate(spec, ids, max_new_tokens=30, temperature=0.8, seed=4, ignore_eos=True)
    assert len(r.token_ids) == 30 and r.timings.verify_steps > 0
    assert generate(spec, ids, max_new_tokens=30, temperature=0.8, seed=4, ignore_eos=True).token_ids == r.token_ids


def test_back_off_when_proposals_are_rejected(engines):
    """Below the break-even a request goes back to one-token steps: fewer verify steps, the same output."""
    plain, spec = engines
    ids = PROMPTS["plain"]
    assert 0 < spec.verify_cost() < 50  # timed here (a tiny model on a CPU: mostly call overhead)
    spec.spec_break_even = 100.0  # no verify step can pay off
    try:
        b = generate(spec, ids, max_new_tokens=100, ignore_eos=True)
    finally:
        spec.spec_break_even = 0.0
    assert b.token_ids == generate(plain, ids, max_new_tokens=100, ignore_eos=True).token_ids
    t = b.timings
    # a window of 4 (+1 enqueued before the 4th is read), then 128 one-token steps
    assert 4 <= t.verify_steps <= 5
    assert len(b.token_ids) - 1 - (t.verify_steps + t.accepted) >= 90  # tokens from one-token steps


def test_bad_speculative_arguments(tmp_path):
    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    with pytest.raises(ValueError, match=r"speculative must be one of .ngram., .draft."):
        Engine(cfg, p, max_seq_len=32, speculative="medusa")
    for k in (0, 16, 2.5):
        with pytest.raises(ValueError, match=r"num_speculative_tokens must be an integer in 1\.\.15"):
            Engine(cfg, p, max_seq_len=32, speculative="ngram", num_speculative_tokens=k)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        load(tmp_path, speculative="ngram", num_speculative_tokens=99)  # before anything is read
    plain = Engine(cfg, p, max_seq_len=32, use_disk_cache=False, compile_sampling=False)
    with pytest.raises(TypeError, match="speculative must be True or False"):
        generate(plain, [1, 2, 3], speculative="yes")
    # K left out: the measured defaults, 8 proposals a step for prompt lookup, 4 for a draft
    assert speculative_tokens("ngram", None) == 8 and speculative_tokens("draft", None) == 4
    assert speculative_tokens("ngram", 3) == 3 and plain.num_speculative_tokens == 0


def test_smollm2_greedy_equal_with_and_without(smollm2_dir):
    """The real model: a prompt that makes it copy text (proposals accepted) and one that does not."""
    plain = load(smollm2_dir, max_seq_len=256, prefill_buckets=(64,), use_disk_cache=False, compile_sampling=False)
    spec = load(smollm2_dir, max_seq_len=256, prefill_buckets=(64,), use_disk_cache=False, compile_sampling=False,
                speculative="ngram", num_speculative_tokens=4)
    spec.spec_break_even = 0.0
    text = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
    for prompt in (f"Repeat this sentence exactly, twice: {text}", "Name three colours."):
        a = generate(plain, prompt, max_new_tokens=40)
        b = generate(spec, prompt, max_new_tokens=40)
        assert b.token_ids == a.token_ids and b.text == a.text
    copy = generate(spec, f"Repeat this sentence exactly, twice: {text}", max_new_tokens=40)
    # copying text: at least half the tokens after the first were accepted proposals
    assert copy.timings.accepted * 2 >= len(copy.token_ids) - 1 >= 8, copy.timings


# ---- a draft model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sp", [dict(temperature=1.0), dict(temperature=0.8, top_k=4)])
def test_draft_acceptance_keeps_the_target_distribution(sp):
    """Proposals drawn from the draft's q, accepted with min(1, p/q), the residual max(p - q, 0) on rejection:
    the first emitted token has the target's row-0 distribution and, after an acceptance, the second row 1's."""
    from hybrid_jax.sampling import filtered_logits

    V, N = 6, 200_000
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, V)) * 1.5, jnp.float32)
    dlogits = jnp.asarray(rng.normal(size=(2, V)) * 1.5, jnp.float32)
    params = make_params(**sp)

    def one(key):
        k0, k1, k2 = jax.random.split(key, 3)
        props = []
        for row, kk in ((0, k0), (1, k1)):  # what the draft step does: sample each proposal from q
            s, order = filtered_logits(dlogits[row], params)
            props.append(order[jax.random.categorical(kk, s)])
        return speculative.accept_draft_sample(logits, dlogits, jnp.asarray(props, jnp.int32), k2, params)

    toks, n = jax.vmap(one)(jax.random.split(jax.random.PRNGKey(3), N))
    toks, n = np.asarray(toks), np.asarray(n)
    p = np.asarray(speculative._probs(logits, params))

    def check(samples, want):
        freq = np.bincount(samples, minlength=V) / len(samples)
        se = np.sqrt(want * (1 - want) / len(samples)) + 1e-4
        assert np.all(np.abs(freq - want) < 4 * se), (freq, want)

    check(toks[:, 0], p[0])
    acc = n >= 2
    assert 0.05 < acc.mean() < 0.95
    check(toks[acc, 1], p[1])


@pytest.fixture(scope="module")
def draft_engines():
    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    dm = make_hf_model("gqa", seed=6, num_hidden_layers=1)  # a smaller model of the same vocabulary
    dcfg = LlamaConfig.from_hf(dm.config.to_dict(), dtype="float32")
    kw = dict(max_seq_len=128, use_disk_cache=False, speculative="draft", num_speculative_tokens=4)
    engines = (Engine(cfg, p, max_seq_len=128, use_disk_cache=False), Engine(cfg, p, draft=(dcfg, hf_params(dm, dcfg)), **kw),
               Engine(cfg, p, draft=(cfg, p), **kw))  # the model as its own draft: every proposal right
    yield engines
    for e in engines:
        e.close()


def test_draft_greedy_output_is_the_output_without_it(draft_engines):
    plain, other, same = draft_engines
    for ids in PROMPTS.values():
        for n in (1, 6, 50):
            a = generate(plain, ids, max_new_tokens=n, ignore_eos=True).token_ids
            for e in (other, same):
                assert generate(e, ids, max_new_tokens=n, ignore_eos=True).token_ids == a
    r = generate(same, PROMPTS["plain"], max_new_tokens=50, ignore_eos=True)
    assert r.timings.accepted == r.timings.proposed > 0  # its own proposals are always its greedy tokens
    assert same.stats()["speculative"]["method"] == "draft"


def test_draft_sampling(draft_engines):
    plain, other, same = draft_engines
    ids = PROMPTS["plain"]
    greedy = generate(plain, ids, max_new_tokens=30, ignore_eos=True).token_ids
    assert generate(other, ids, max_new_tokens=30, temperature=1.0, top_k=1, seed=1, ignore_eos=True).token_ids == greedy
    r = generate(same, ids, max_new_tokens=30, temperature=0.9, seed=2, ignore_eos=True)
    assert len(r.token_ids) == 30 and r.timings.accepted == r.timings.proposed  # p = q: always accepted
    r2 = generate(other, ids, max_new_tokens=30, temperature=0.9, seed=2, ignore_eos=True)
    assert len(r2.token_ids) == 30 and r2.timings.verify_steps > 0


def test_a_draft_of_another_vocabulary_is_refused(tmp_path, tiny_tokenizer_dir):
    from convert.api import convert
    from convert_fixtures import save_hf

    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    other = make_hf_model("gqa", seed=6, vocab_size=200)
    ocfg = LlamaConfig.from_hf(other.config.to_dict(), dtype="float32")
    with pytest.raises(ValueError, match="vocabulary has 200 tokens, the model's 160"):
        Engine(cfg, hf_params(m, cfg), max_seq_len=32, speculative="draft", draft=(ocfg, hf_params(other, ocfg)))
    with pytest.raises(ValueError, match='speculative="draft" needs a draft model'):
        Engine(cfg, hf_params(m, cfg), max_seq_len=32, speculative="draft")
    target = convert(save_hf(m, tmp_path / "t", tiny_tokenizer_dir), tmp_path / "tc", dtype="float32", progress=False)
    draft = convert(save_hf(make_hf_model("gqa", seed=6, num_hidden_layers=1), tmp_path / "d", tiny_tokenizer_dir),
                    tmp_path / "dc", dtype="float32", progress=False)
    e = load(target, max_seq_len=64, speculative="draft", draft=draft, use_disk_cache=False, compile_sampling=False)
    assert generate(e, "the quick fox", max_new_tokens=8, ignore_eos=True).timings.verify_steps > 0
    e.close()
    import json
    tj = json.loads((draft / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two tokens swapped
    (draft / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="has another vocabulary"):
        load(target, max_seq_len=64, speculative="draft", draft=draft)
    with pytest.raises(ValueError, match='needs draft=DIR'):
        load(target, speculative="draft")


def test_warmup_compiles_the_sampling_verify_step(tmp_path):
    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    e = Engine(cfg, hf_params(m, cfg), max_seq_len=32, cache_dir=tmp_path, compile_sampling=False,
               speculative="ngram", num_speculative_tokens=3)
    rt = e.runtime
    assert rt.compiled(("verify", rt.cache_len, 3, False)) and not rt.compiled(("verify", rt.cache_len, 3, True))
    e.warmup()
    assert rt.compiled(("verify", rt.cache_len, 3, True))
    e.close()
