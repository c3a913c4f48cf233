"""Bad input to `python -m convert`: status 1, one line `error: ...` naming the problem, no output folder and
no temp folder left beside it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_hf_model
from convert.__main__ import main
from convert_fixtures import save_hf, spm_dir, tiny_tokenizer_dir, write_gguf, write_meta  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gqa():
    return make_hf_model("gqa", seed=7)


@pytest.fixture(scope="module")
def hf_src(tiny_gqa, tmp_path_factory) -> Path:
    return save_hf(tiny_gqa, tmp_path_factory.mktemp("src") / "hf")


@pytest.fixture(scope="module")
def meta_src(tiny_gqa, spm_dir, tmp_path_factory) -> Path:
    return write_meta(tiny_gqa, tmp_path_factory.mktemp("src") / "meta", spm_dir, n_shards=2)


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def fails(capsys, tmp_path: Path, src, *extra: str) -> str:
    """Run the CLI into tmp_path/out; assert status 1, one error line, nothing new in tmp_path. The line."""
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()  # drop what setting up printed
    with pytest.raises(SystemExit) as e:
        main(["--src", str(src), "--out", str(tmp_path / "out"), "--dtype", "float32", *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert sorted(os.listdir(tmp_path)) == before  # no output folder, no .out.tmp-* folder
    return err[0]


def rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    d = load_file(str(path))
    edit(d)
    save_file(d, str(path), metadata={"format": "pt"})


def test_src_does_not_exist(tmp_path, capsys):
    assert "does not exist" in fails(capsys, tmp_path, tmp_path / "nowhere")


def test_folder_of_no_known_format(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 16)
    assert "no known format" in fails(capsys, tmp_path, tmp_path / "junk")


def test_missing_tensor(hf_src, tmp_path, capsys):
    src = copy_of(hf_src, tmp_path)
    rewrite_safetensors(src / "model.safetensors", lambda d: d.pop("model.layers.1.mlp.up_proj.weight"))
    msg = fails(capsys, tmp_path, src)
    assert "missing tensor" in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_tensor_of_wrong_shape(hf_src, tmp_path, capsys):
    src = copy_of(hf_src, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_safetensors(src / "model.safetensors", lambda d: d.update({name: d[name][:16]}))
    msg = fails(capsys, tmp_path, src)
    assert name in msg and "shape (16, 64)" in msg and "expected (32, 64)" in msg


def test_unexpected_tensor(hf_src, tmp_path, capsys):
    src = copy_of(hf_src, tmp_path)
    rewrite_safetensors(src / "model.safetensors",
                        lambda d: d.update({"model.layers.0.self_attn.q_proj.bias": d["model.norm.weight"]}))
    assert "model.layers.0.self_attn.q_proj.bias" in fails(capsys, tmp_path, src)


def test_truncated_safetensors(hf_src, tmp_path, capsys):
    src = copy_of(hf_src, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = fails(capsys, tmp_path, src)
    assert "truncated" in msg and "model.safetensors" in msg


def test_nan_in_a_source_tensor(hf_src, tmp_path, capsys):
    src = copy_of(hf_src, tmp_path)
    name = "model.layers.0.self_attn.v_proj.weight"
    rewrite_safetensors(src / "model.safetensors", lambda d: d.update({name: d[name] * float("nan")}))
    msg = fails(capsys, tmp_path, src)
    assert name in msg and "model.safetensors" in msg and "NaN/Inf" in msg


def test_layer_count_contradicts_the_weights(hf_src, tmp_path, capsys):
    """Checked from the tensor names before any per-layer table is built (a corrupt count cannot exhaust memory)."""
    src = copy_of(hf_src, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100000}))
    assert "config.json says num_hidden_layers=100000, but the weights hold 2 layers" in fails(capsys, tmp_path, src)


def test_out_inside_the_source_folder(hf_src, tmp_path, capsys):
    for f in hf_src.iterdir():  # the source is tmp_path itself: --out tmp_path/out is inside it
        shutil.copy2(f, tmp_path / f.name)
    assert "inside the source folder" in fails(capsys, tmp_path, tmp_path)


def test_missing_shard_file(tiny_gqa, tmp_path, capsys):
    src = save_hf(tiny_gqa, tmp_path / "hf", shard=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (src / gone).unlink()
    msg = fails(capsys, tmp_path, src)
    assert gone in msg and "does not exist" in msg


@pytest.mark.parametrize("edit,words", [
    ({"n_layers": 3}, ["params.json", "n_layers=3", "2 layers"]),
    ({"dim": 128}, ["params.json", "tok_embeddings.weight"]),
    ({"n_kv_heads": 1}, ["params.json", "layers.0.attention.wk.weight", "shape (32, 64)", "expected (16, 64)"]),
    ({"multiple_of": 256}, ["params.json", "layers.0.feed_forward.w1.weight", "ffn dim 256"]),
])
def test_params_json_contradicts_weights(meta_src, tmp_path, capsys, edit, words):
    src = copy_of(meta_src, tmp_path)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, **edit}))
    msg = fails(capsys, tmp_path, src)
    assert all(w in msg for w in words), msg


def test_meta_missing_tensor_and_tokenizer(meta_src, tmp_path, capsys):
    import torch

    src = copy_of(meta_src, tmp_path)
    for f in ("consolidated.00.pth", "consolidated.01.pth"):
        shard = torch.load(src / f, weights_only=True)
        del shard["layers.1.feed_forward.w3.weight"]
        torch.save(shard, src / f)
    assert "layers.1.feed_forward.w3.weight" in fails(capsys, tmp_path, src)
    (src / "tokenizer.model").unlink()
    assert "tokenizer.model" in fails(capsys, tmp_path, src)


def test_existing_output_without_force(hf_src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "already exists" in fails(capsys, tmp_path, hf_src)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_no_temp_folder_and_keeps_old_output(hf_src, tiny_tokenizer_dir, tmp_path,
                                                                          capsys, monkeypatch):
    src = copy_of(hf_src, tmp_path)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, src / f.name)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("convert.hf.shutil.copy2", disk_full)  # fails inside checkpoint.save, after the weights
    assert "No space left" in fails(capsys, tmp_path, src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "No space left" in fails(capsys, tmp_path, src, "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"  # --force replaces only on success


def test_unknown_dtype(hf_src, tmp_path, capsys):
    msg = fails(capsys, tmp_path, hf_src, "--dtype", "int4")
    assert "dtype" in msg and "int4" in msg


def test_corrupt_gguf(smollm2_gguf, tmp_path, capsys):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    msg = fails(capsys, tmp_path, tmp_path / "junk.gguf")
    assert "GGUF" in msg and "junk.gguf" in msg
    with open(smollm2_gguf, "rb") as f:  # a real file cut short: a broken download
        (tmp_path / "cut.gguf").write_bytes(f.read(os.path.getsize(smollm2_gguf) * 9 // 10))
    msg = fails(capsys, tmp_path, tmp_path / "cut.gguf")
    assert "GGUF" in msg and "cut.gguf" in msg


def test_gguf_of_another_architecture(tiny_gqa, tmp_path, capsys):
    src = write_gguf(tiny_gqa, tmp_path / "other.gguf", arch="qwen2")
    msg = fails(capsys, tmp_path, src)
    assert "architecture" in msg and "qwen2" in msg


def test_gguf_rope_freqs_of_unknown_scaling(tmp_path, capsys):
    src = write_gguf(make_hf_model("llama3", seed=7), tmp_path / "l3.gguf")  # original context 64, not 8192
    assert "rope_freqs" in fails(capsys, tmp_path, src)


def test_real_cli_one_line_and_status_1(tmp_path):
    """The real entry point (a subprocess): usage errors too are one line and status 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    for args in (["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], ["--src", "x"]):
        r = subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert os.listdir(tmp_path) == []


def test_checkpoint_of_an_older_format_is_refused_with_the_command(hf_src, tmp_path, monkeypatch):
    """A checkpoint written by format version 1 (the layer matrices input-major) is not restored as if it were
    version 2: loading it names the version and the command that converts its source again; the default
    model's cached conversion is redone instead of used."""
    import hybrid_jax
    from hybrid_jax import checkpoint, default_model

    out = tmp_path / "ckpt"
    main(["--src", str(hf_src), "--out", str(out), "--dtype", "float32"])
    assert checkpoint.is_current(out) and checkpoint.load_config(out).n_layers == 2
    meta = json.loads((out / "config.json").read_text())
    meta["format_version"] = 1
    (out / "config.json").write_text(json.dumps(meta))
    assert checkpoint.is_checkpoint(out) and not checkpoint.is_current(out)
    for load in (checkpoint.load_config, lambda p: checkpoint.restore(p), lambda p: hybrid_jax.load(p)):
        with pytest.raises(ValueError, match=r"format version 1.*reads version 2.*python -m convert --src .*hf"):
            load(out)
    # the default model: an old conversion in the cache is converted again (force), a current one is used
    monkeypatch.setattr(default_model, "default_model_dir", lambda: out)
    monkeypatch.setattr(default_model, "smollm2_gguf", lambda: hf_src)
    calls = []
    import convert.api
    monkeypatch.setattr(convert.api, "convert", lambda src, dst, **kw: calls.append((src, dst, kw)) or dst)
    assert default_model.ensure_default_model(progress=False) == out
    assert calls and calls[0][2]["force"] is True
    meta["format_version"] = checkpoint.FORMAT_VERSION
    (out / "config.json").write_text(json.dumps(meta))
    calls.clear()
    assert default_model.ensure_default_model(progress=False) == out and not calls
