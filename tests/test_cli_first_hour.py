"""What a new user meets on the command line: the prompt from a file or stdin, defaults that fit --max-seq-len,
a ready line, chat that survives a full context, --help with defaults, --version."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_hf_model
from convert.api import convert
from convert_fixtures import save_hf, spm_dir, tiny_tokenizer_dir  # noqa: F401  (fixtures)
from hybrid_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("cli1h")
    return convert(save_hf(make_hf_model("gqa", seed=7), d / "hf", tiny_tokenizer_dir), d / "model",
                   dtype="float32", progress=False)


def _gen(capsys, model, cache, *extra) -> tuple[str, str]:
    assert main(["generate", "--model", str(model), "--raw", "--max-seq-len", "48", "--cache-dir", str(cache),
                 "--max-new-tokens", "6", *extra]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_prompt_from_file_and_stdin_equal_the_argument(tiny_model, tmp_path, capsys, monkeypatch):
    text = "the quick brown fox jumps"
    want, err = _gen(capsys, tiny_model, tmp_path / "xc", "--prompt", text)
    assert re.search(r"ready in [\d.]+ s \(\d+ executables loaded from the disk cache, \d+ compiled", err), err
    f = tmp_path / "p.txt"
    f.write_text(text)
    assert _gen(capsys, tiny_model, tmp_path / "xc", "--prompt-file", str(f))[0] == want
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert _gen(capsys, tiny_model, tmp_path / "xc", "--prompt", "-")[0] == want
    assert main(["generate", "--model", str(tiny_model), "--prompt", "x", "--prompt-file", str(f)]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model)]) == 1
    assert "--prompt-file" in capsys.readouterr().err


def test_default_answer_length_fits_max_seq_len_and_says_so(tiny_model, tmp_path, capsys):
    """The default --max-new-tokens (256) is clipped to what the prompt leaves of --max-seq-len, in one line;
    an explicit one that does not fit is still an error."""
    args = ["generate", "--model", str(tiny_model), "--raw", "--prompt", "the quick brown fox", "--max-seq-len", "32",
            "--cache-dir", str(tmp_path), "--stats"]
    assert main(args) == 0
    err = capsys.readouterr().err
    m = re.search(r"answer limited to (\d+) tokens: the prompt has (\d+) of --max-seq-len 32", err)
    assert m and int(m.group(1)) + int(m.group(2)) == 32, err
    assert main(args + ["--max-new-tokens", "40"]) == 1
    assert "exceeds max_seq_len 32" in capsys.readouterr().err


def test_bad_arguments_fail_before_loading(tiny_model, capsys):
    assert main(["generate", "--model", str(tiny_model), "--prompt", "hi", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert "temperature" in err and "loading" not in err


def test_help_shows_defaults_and_describes_every_option(capsys):
    for cmd in ("generate", "chat", "warmup", "verify"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        opts = re.findall(r"^  (--[a-z-]+)(.*)$", out, flags=re.M)
        for name, rest in opts:  # the help text follows on the same line or the next
            following = out.split(name + rest, 1)[1].split("\n", 2)[1]
            assert rest.strip(" A-Z_") or following.startswith(" " * 20), (cmd, name)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 1)" in out and "(default: 0.0)" in out  # --tp, --temperature
    r = subprocess.run([sys.executable, "-m", "hybrid_jax", "--version"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and re.fullmatch(r"hybrid-jax \d+\.\d+\.\d+\n", r.stdout), r.stdout


def test_chat_keeps_going_when_the_context_fills(smollm2_dir, tmp_path):
    """A conversation longer than --max-seq-len: the oldest turns leave (said in one line), every question is
    answered, /stats and /reset work, /exit ends with status 0. Run as a user runs it (a subprocess)."""
    lines = ["Tell me about the history of Paris.", "And London?", "/stats", "And Rome?", "And Madrid?",
             "/reset", "Hello", "/exit", "never read"]
    r = subprocess.run([sys.executable, "-m", "hybrid_jax", "chat", "--model", str(smollm2_dir), "--max-seq-len",
                        "96", "--max-new-tokens", "24", "--cache-dir", str(tmp_path)], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "/reset" in r.stderr and "/exit" in r.stderr  # the commands are listed at start
    assert "context full: the oldest" in r.stderr
    assert "conversation reset" in r.stderr and '"compiles"' in r.stdout + r.stderr
    answers = [a for a in r.stdout.split("> ") if a.strip()]
    assert len(answers) == 5, r.stdout  # five questions, five answers: none lost to the full context
    assert "Traceback" not in r.stderr and "error" not in r.stderr.lower(), r.stderr[-3000:]


def test_warmed_buckets_are_used_by_a_later_generate(tiny_model, tmp_path, capsys):
    """`hybrid-jax warmup` fills the disk cache; a later `hybrid-jax generate` process loads the prompt's own
    bucket from it (one chunk, nothing compiled) instead of running the prompt through the 16-row chunk."""
    cache = str(tmp_path / "xc")
    assert main(["warmup", "--model", str(tiny_model), "--max-seq-len", "48", "--cache-dir", cache,
                 "--no-progress"]) == 0
    capsys.readouterr()
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 2)  # > 16 tokens: the 32-row bucket
    r = subprocess.run([sys.executable, "-m", "hybrid_jax", "generate", "--model", str(tiny_model), "--raw",
                        "--prompt", prompt, "--max-seq-len", "48", "--cache-dir", cache, "--max-new-tokens", "4",
                        "--stats"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["compiles"] == 0 and stats["compiled"] == [], stats
    assert ["prefill", 32, 32] in stats["loaded_from_disk"] and stats["buckets_compiled"] == [32]
    assert stats["background_compiles_started"] == 0  # the one-shot command queues nothing
    assert "0 compiled" in r.stderr


def test_first_ever_answer_compiles_beside_the_conversion(tmp_path):
    """Empty caches: the default model converts while its executables compile from its shapes; the load then
    loads them and compiles nothing, and the answer is right."""
    env = {**os.environ, "HYBRID_JAX_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "hybrid_jax", "generate", "--prompt", "What is the capital of France?",
                        "--max-seq-len", "128", "--max-new-tokens", "10"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert re.search(r"ready in [\d.]+ s \(2 executables compiled beside the conversion, 2 loaded from the disk "
                     r"cache, 0 compiled", r.stderr), r.stderr
