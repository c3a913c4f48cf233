"""The `hybrid-jax` command line: `warmup` fills the disk cache that later processes load from; a one-shot
`generate` compiles nothing beside its request."""
from __future__ import annotations

import json
import re

import pytest

from conftest import make_hf_model
from convert.api import convert
from convert_fixtures import save_hf, spm_dir, tiny_tokenizer_dir  # noqa: F401  (fixtures)
from hybrid_jax.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("cli")
    return convert(save_hf(make_hf_model("gqa", seed=7), d / "hf", tiny_tokenizer_dir), d / "model",
                   dtype="float32", progress=False)


def _counts(text: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) executables ready in [\d.]+ s: (\d+) compiled, (\d+) loaded from the cache", text)
    assert m, text
    return tuple(int(x) for x in m.groups())


def test_warmup_compiles_every_bucket_once_then_loads_them(tmp_path, capsys, tiny_model):
    args = ["warmup", "--model", str(tiny_model), "--max-seq-len", "48", "--cache-dir", str(tmp_path / "xc"),
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    n, compiled, loaded = _counts(out)
    # the greedy decode step and the universal prefill (16 rows over the 64-row cache) at load; buckets 16, 32,
    # 48, the rest of a prompt after reused rows (32 and 48 rows over the whole cache) and the sampling step
    assert (n, compiled, loaded) == (8, 8, 0)
    assert "prefill buckets [16, 32, 48]" in out
    assert len(list((tmp_path / "xc").glob("*.xla"))) == 8
    assert main(args) == 0  # a second process (here: a second engine) compiles nothing
    assert _counts(capsys.readouterr().out) == (8, 0, 8)


def test_warmup_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["warmup", "--model", str(tmp_path / "missing"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err


def test_generate_compiles_nothing_beside_its_request(tmp_path, capsys, tiny_model):
    """One request, then the process ends: its prompt's bucket and the sampling step are not compiled in the
    background (on a 2-core CPU those compiles made the quick start's tokens 2.2x slower)."""
    args = ["generate", "--model", str(tiny_model), "--prompt", "hello there, how are you", "--raw",
            "--max-seq-len", "48", "--cache-dir", str(tmp_path / "xc"), "--max-new-tokens", "4", "--stats"]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert stats["background_compiles_running"] == 0 and stats["buckets_compiled"] == []
    assert stats["decode_steps_compiled"] == [[stats["cache_len"], False]]  # the greedy step only
    assert stats["compiles"] == 2  # the greedy step and the universal prefill, at load
