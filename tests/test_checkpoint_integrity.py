"""A converted checkpoint that is damaged, inconsistent or half-written: every load failure is one line naming
the file (or the tensor and config.json) and the fix; a corrupt source is refused at conversion; a dead
writer's temporary folder is removed by the next conversion to the same output, a live writer's is kept."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import make_hf_model
from convert.api import convert
from convert_fixtures import save_hf, spm_dir, tiny_tokenizer_dir, write_gguf, write_meta  # noqa: F401
from hybrid_jax import checkpoint
from hybrid_jax.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
FIX = r"python -m convert --src .*hf --out .* --force"


@pytest.fixture(scope="module")
def tiny():
    return make_hf_model("gqa", seed=3)


@pytest.fixture(scope="module")
def hf_src(tiny, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return save_hf(tiny, tmp_path_factory.mktemp("src") / "hf", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def good(hf_src, tmp_path_factory) -> Path:
    return convert(hf_src, tmp_path_factory.mktemp("ckpt") / "model", dtype="float32", progress=False)


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    """A private copy of the good checkpoint, to damage."""
    return Path(shutil.copytree(good, tmp_path / "model"))


def data_files(ckpt: Path) -> list[Path]:
    """The checkpoint's Orbax data files, largest first."""
    files = [p for p in (ckpt / "weights").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def flip_byte(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def meta_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def edit_config(ckpt: Path, edit) -> None:
    meta = meta_of(ckpt)
    edit(meta)
    (ckpt / "config.json").write_text(json.dumps(meta, indent=2))


def one_line_error(fn, *args, match: str, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value), str(e.value)
    return e.value


# ---- the manifest and verify -----------------------------------------------------------------------

def test_manifest_lists_every_file_and_verify_passes(good):
    meta = meta_of(good)
    on_disk = sorted(p.relative_to(good).as_posix() for p in good.rglob("*") if p.is_file())
    assert sorted(meta["files"]) == [f for f in on_disk if f != "config.json"]  # no lock file left behind
    assert "weights/_METADATA" in meta["files"] and "tokenizer.json" in meta["files"]
    for rel, e in meta["files"].items():
        assert e["size"] == (good / rel).stat().st_size and len(e["sha256"]) == 64
    res = checkpoint.verify(good, progress=False)
    assert res["files"] == len(meta["files"]) and res["bytes"] > 0 and res["unlisted"] == []
    assert checkpoint.is_intact(good)
    cfg, w = checkpoint.restore(good, verify=True, progress=False)
    assert cfg.n_layers == 2 and w.layers.w13.shape == (2, 2, 96, 64)


def test_flipped_bytes_caught_by_verify(ckpt):
    big = data_files(ckpt)[0]
    flip_byte(big, big.stat().st_size // 2)
    rel = big.relative_to(ckpt).as_posix()
    err = one_line_error(checkpoint.verify, ckpt, progress=False, match=rf"{rel} does not match its sha256.*{FIX}")
    assert str(ckpt) in str(err)
    one_line_error(checkpoint.restore, ckpt, verify=True, progress=False, match=rf"{rel} does not match its sha256")


def test_flipped_bytes_that_orbax_trips_on_are_one_line(hf_src, tmp_path, monkeypatch):
    """Same size, garbage bytes at a compressed chunk's start: the manifest's sizes match, TensorStore fails.
    Checkpoints are written uncompressed now (where a flipped data byte is another valid number, which only
    verify finds); those of earlier versions have zstd chunks, and still load."""
    import gc
    import types

    import orbax.checkpoint as ocp

    monkeypatch.setattr(checkpoint, "_writer", lambda: ocp.Checkpointer(ocp.PyTreeCheckpointHandler()))
    ckpt = convert(hf_src, tmp_path / "model", dtype="float32", progress=False)
    checkpoint.restore(ckpt)  # an older, compressed checkpoint loads
    flip_byte(data_files(ckpt)[0], 10)
    err = one_line_error(checkpoint.restore, ckpt, match=rf"cannot read tensor '[\w.]+' of checkpoint .*damaged.*{FIX}")
    assert err.__cause__ is not None  # the original TensorStore error, for --debug
    # no read coroutine is left suspended, to print "Exception ignored in" (60 lines each) when collected
    left = [o for o in gc.get_objects() if isinstance(o, types.CoroutineType) and o.cr_frame is not None
            and o.cr_code.co_name == "_read_array_index_and_device_put"]
    assert left == []


def test_suspended_orbax_reads_are_closed_quietly(monkeypatch):
    """A read coroutine of a failed restore, left suspended, written as Orbax writes it: `_close_orbax_reads`
    closes it and drops the Exception its close raises (else printed as "Exception ignored in" when collected)."""
    import gc

    class Suspend:
        def __await__(self):
            yield

    async def _read_array_index_and_device_put():
        try:
            await Suspend()
        except BaseException as e:
            raise Exception("Encountered error while reading array index: ... (60 lines)") from e

    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    coro = _read_array_index_and_device_put()
    coro.send(None)
    checkpoint._close_orbax_reads()
    assert coro.cr_frame is None  # closed
    del coro
    gc.collect()
    assert reports == []


def test_edited_config_json_caught_by_verify(ckpt):
    edit_config(ckpt, lambda m: m["model"].update(rope_theta=10001.0))
    checkpoint.restore(ckpt)  # a plausible value: loads
    one_line_error(checkpoint.verify, ckpt, progress=False, match=r"config\.json does not match its config_sha256")


@pytest.mark.parametrize("damage,words", [
    (lambda f: f.write_bytes(f.read_bytes()[:-100]), "is truncated"),
    (lambda f: f.write_bytes(f.read_bytes() + b"\0"), "is too long"),
    (lambda f: f.unlink(), "is missing"),
])
def test_truncated_or_deleted_data_file_is_one_line_at_restore(ckpt, damage, words):
    f = data_files(ckpt)[0]
    damage(f)
    rel = f.relative_to(ckpt).as_posix()
    err = one_line_error(checkpoint.restore, ckpt, match=rf"checkpoint .* is damaged: {rel} {words}.*{FIX}")
    assert not checkpoint.is_intact(ckpt)
    assert len(str(err)) < 400


def test_deleted_tokenizer_file_is_named(ckpt):
    (ckpt / "tokenizer.json").unlink()
    one_line_error(checkpoint.restore, ckpt, match=r"tokenizer\.json is missing")


# ---- config.json -----------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda m: m["model"].pop("dim"), r"config\.json lacks the field\(s\) model\.dim"),
    (lambda m: m["model"].update(n_experts=8), r"config\.json has unknown field\(s\) model\.n_experts"),
    (lambda m: m["model"].update(dim="64"), r"config\.json: field model\.dim = \"64\" is not int"),
    (lambda m: m["model"].update(eos_token_ids=2), r"config\.json: field model\.eos_token_ids"),
    (lambda m: m["model"].update(n_kv_heads=3), r"config\.json: invalid LlamaConfig: n_heads \(4\) must be a multiple"),
    (lambda m: m.pop("model"), r"config\.json lacks the 'model' object"),
    (lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0" * 64}}), r"config\.json: the entry '\.\./x'"),
])
def test_config_json_field_errors_are_one_line(ckpt, edit, match):
    edit_config(ckpt, edit)
    one_line_error(checkpoint.load_config, ckpt, match=rf"{match}.*{FIX}")
    one_line_error(checkpoint.restore, ckpt, match=match)


def test_config_json_not_json_or_missing(ckpt):
    (ckpt / "config.json").write_text('{"format": "hybrid_jax", ')
    one_line_error(checkpoint.load_config, ckpt, match=r"config\.json is not valid JSON")
    (ckpt / "config.json").write_text('{"model": {}}')
    one_line_error(checkpoint.restore, ckpt, match=r"has a config\.json without \"format\": \"hybrid_jax\"")
    (ckpt / "config.json").unlink()
    one_line_error(checkpoint.restore, ckpt, match=r"checkpoint .* has no config\.json: convert it again")


@pytest.mark.parametrize("field,value,tensor", [
    ("ffn_dim", 128, "layers.w13"),
    ("n_layers", 3, "layers.attn_norm"),
    ("vocab_size", 170, "embed"),
    ("tie_embeddings", True, "lm_head"),
])
def test_config_json_of_the_wrong_dimension_names_tensor_and_config(ckpt, field, value, tensor):
    edit_config(ckpt, lambda m: m["model"].update({field: value}))
    err = one_line_error(checkpoint.restore, ckpt, match=rf"'?{tensor}'?.*config\.json.*{FIX}")
    assert field in str(err) or "tie_embeddings" in str(err)


def test_config_json_of_the_wrong_dtype(ckpt):
    edit_config(ckpt, lambda m: m["model"].update(dtype="bfloat16"))
    one_line_error(checkpoint.restore, ckpt,
                   match=r"tensor 'embed' .* stored as float32, but config\.json says dtype bfloat16")


# ---- checkpoints written before the manifest ---------------------------------------------------------

def test_checkpoint_without_manifest_loads_with_one_warning(ckpt, monkeypatch):
    edit_config(ckpt, lambda m: (m.pop("files"), m.pop("config_sha256")))
    assert checkpoint.is_current(ckpt) and not checkpoint.has_manifest(ckpt) and not checkpoint.is_intact(ckpt)
    with pytest.warns(UserWarning, match=rf"has no file manifest.*{FIX}` to add one"):
        cfg, _ = checkpoint.restore(ckpt)
    assert cfg.n_layers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.restore(ckpt)  # warned once
    one_line_error(checkpoint.verify, ckpt, progress=False, match=r"has no file manifest.*cannot be verified")

    # the default model's cache without a manifest is converted again
    from hybrid_jax import default_model
    import convert.api

    monkeypatch.setattr(default_model, "default_model_dir", lambda: ckpt)
    calls = []
    monkeypatch.setattr(convert.api, "convert", lambda src, dst, **kw: calls.append(kw) or dst)
    default_model.ensure_default_model(progress=False)
    assert calls and calls[0]["force"] is True


def test_default_model_cache_with_a_truncated_file_is_converted_again(ckpt, monkeypatch):
    from hybrid_jax import default_model
    import convert.api

    monkeypatch.setattr(default_model, "default_model_dir", lambda: ckpt)
    calls = []
    monkeypatch.setattr(convert.api, "convert", lambda src, dst, **kw: calls.append(kw) or dst)
    default_model.ensure_default_model(progress=False)
    assert not calls  # intact: used as it is
    f = data_files(ckpt)[0]
    f.write_bytes(f.read_bytes()[:-1])
    default_model.ensure_default_model(progress=False)
    assert calls and calls[0]["force"] is True


# ---- corrupt sources ---------------------------------------------------------------------------------

def rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    d = load_file(str(path))
    edit(d)
    save_file(d, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_safetensors_source_is_refused(hf_src, tmp_path, bad):
    src = Path(shutil.copytree(hf_src, tmp_path / "hf"))
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(d):
        d[name] = d[name].copy()
        d[name][3, 5] = bad

    rewrite_safetensors(src / "model.safetensors", poison)
    with pytest.raises(ValueError, match=rf"tensor '{name}' in model\.safetensors holds 1 NaN/Inf value\(s\) "
                                         r"\(first at index \(3, 5\)\)") as e:
        convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no temporary folder


def test_nan_in_a_gguf_source_is_refused(tmp_path):
    import torch

    m = make_hf_model("gqa", seed=5)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight[7, 2] = float("nan")
    src = write_gguf(m, tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' \(GGUF "
                                         r"'blk\.0\.attn_output\.weight', dequantised\) in tiny\.gguf holds 1 NaN/Inf"):
        convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert os.listdir(tmp_path) == ["tiny.gguf"]


def test_inf_in_a_meta_source_is_refused(spm_dir, tmp_path):
    import torch

    m = make_hf_model("gqa", seed=5)
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[0, 0] = float("-inf")
    src = write_meta(m, tmp_path / "meta", spm_dir, n_shards=2)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.self_attn\.v_proj\.weight' \('layers\.1\."
                                         r"attention\.wv\.weight'\) in consolidated\.00\.pth, consolidated\.01\.pth "
                                         r"holds 1 NaN/Inf"):
        convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert os.listdir(tmp_path) == ["meta"]


@pytest.mark.parametrize("offset,field", [(0, "magic"), (4, "version"), (8, "tensor count"), (16, "metadata count")])
def test_gguf_with_a_flipped_header_byte_is_refused(tiny, tmp_path, offset, field):
    """GGUF has no checksum: damage to its header is caught by the reader; see convert/gguf_src.py for the rest."""
    src = write_gguf(tiny, tmp_path / "tiny.gguf")
    flip_byte(src, offset)
    with pytest.raises(ValueError, match=r"corrupt or truncated GGUF file .*tiny\.gguf") as e:
        convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["tiny.gguf"]


def gguf_offset(path: Path, key: str | None = None, tensor: str | None = None) -> int:
    """The file offset of a metadata value (`key`) or of a tensor info's data offset (`tensor`)."""
    import gguf

    r = gguf.GGUFReader(path)
    if key is not None:
        part = r.fields[key].parts[r.fields[key].data[0]]
    else:
        part = next(t for t in r.tensors if t.name == tensor).field.parts[-1]
    return part.ctypes.data - r.data.ctypes.data


def test_gguf_with_an_absurd_block_count_is_refused_without_exhausting_memory(tiny, tmp_path):
    """block_count 2 -> 4278190082: refused from the tensors present before any per-layer table is built."""
    src = write_gguf(tiny, tmp_path / "tiny.gguf")
    flip_byte(src, gguf_offset(src, key="llama.block_count") + 3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    # `python -m convert` under a 4 GiB address-space limit (set in the child: no preexec_fn fork under JAX)
    run = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
           "runpy.run_module('convert', run_name='__main__', alter_sys=True)")
    r = subprocess.run([sys.executable, "-c", run, "--src", str(src), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "llama.block_count=4278190082, but the weights hold 2 layers" in lines[0]


def test_gguf_with_a_damaged_tensor_data_offset_is_refused(tiny, tmp_path):
    src = write_gguf(tiny, tmp_path / "tiny.gguf")
    flip_byte(src, gguf_offset(src, tensor="blk.1.ffn_up.weight"))
    with pytest.raises(ValueError, match=r"corrupt GGUF file tiny\.gguf: tensor 'blk\.1\.ffn_up\.weight' has data offset"):
        convert(src, tmp_path / "out", dtype="float32", progress=False)


def test_float16_overflow_is_refused(hf_src, tmp_path):
    src = Path(shutil.copytree(hf_src, tmp_path / "hf"))
    name = "model.norm.weight"
    rewrite_safetensors(src / "model.safetensors", lambda d: d.update({name: d[name] * 1e5}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' in model\.safetensors holds values up to .* beyond "
                                         r"float16's range"):
        convert(src, tmp_path / "out", dtype="float16", progress=False)


def test_out_inside_src_is_refused(hf_src, tmp_path):
    src = Path(shutil.copytree(hf_src, tmp_path / "hf"))
    for out in (src / "converted", src / "a" / "b"):
        with pytest.raises(ValueError, match=r"output folder .* is inside the source folder .*: choose an --out"):
            convert(src, out, dtype="float32", progress=False)
    (tmp_path / "link").symlink_to(src)  # the same folder through a symbolic link
    with pytest.raises(ValueError, match=r"inside the source folder"):
        convert(src, tmp_path / "link" / "converted", dtype="float32", progress=False)
    assert sorted(os.listdir(src)) == sorted(os.listdir(hf_src))


def test_cli_error_is_one_line(hf_src, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "convert", "--src", str(hf_src), "--out", str(hf_src / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "inside the source folder" in lines[0], r.stderr
    assert not (hf_src / "out").exists()


# ---- temporary folders of interrupted writes -------------------------------------------------------

HANG = """
import os, sys, time
from pathlib import Path
import numpy as np
from hybrid_jax import checkpoint, weights
from hybrid_jax.config import LlamaConfig

out, stage = Path(sys.argv[1]), sys.argv[2]
cfg = LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, dtype="float32")
s = weights.shapes(cfg)
params = {k: np.zeros(v, np.float32) for k, v in s.items() if k != "layers"}
params["layers"] = {k: np.zeros(v, np.float32) for k, v in s["layers"].items()}

def hang(folder):
    print(folder, flush=True)
    time.sleep(600)

if stage == "tmp":  # the weights written, the tokenizer being written into the temporary folder
    checkpoint.save(out, cfg, params, write_tokenizer=hang, force=True)
else:  # --force's swap: the previous checkpoint moved into its .old- folder, the new one not yet in place
    checkpoint.save(out, cfg, params, force=True)
    real = os.rename
    def rename(a, b):
        real(a, b)
        if Path(a) == out:
            hang(Path(b).parent)
    os.rename = rename
    checkpoint.save(out, cfg, params, force=True)
"""


def writer(out: Path, stage: str) -> tuple[subprocess.Popen, Path]:
    """A process inside checkpoint.save to `out`, paused at `stage`, and the temporary folder it holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, "-c", HANG, str(out), stage], stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().strip()
    assert line, "the writer died before pausing"
    return p, Path(line)


def test_stale_temp_folders_of_dead_writers_are_removed_live_ones_kept(hf_src, tmp_path):
    out = tmp_path / "model"
    dead_old, dead_old_dir = writer(out, "old")
    dead_tmp, dead_tmp_dir = writer(out, "tmp")
    live, live_dir = writer(out, "tmp")
    other, other_dir = writer(tmp_path / "other", "tmp")  # another output's: not this conversion's to judge
    unlocked = tmp_path / ".model.tmp-abcd1234"  # no lock file (not ours, or a writer renaming): kept
    unlocked.mkdir()
    try:
        for p in (dead_tmp, dead_old, other):
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert dead_tmp_dir.name.startswith(".model.tmp-") and dead_old_dir.name.startswith(".model.old-")
        assert (dead_old_dir / "x" / "config.json").is_file() and (dead_tmp_dir / "weights").is_dir()
        assert not out.exists()  # the killed swap left it moved away
        convert(hf_src, out, dtype="float32", progress=False)
        assert not dead_tmp_dir.exists() and not dead_old_dir.exists()
        assert live_dir.is_dir() and (live_dir / checkpoint.LOCK_FILE).is_file()
        assert other_dir.is_dir() and unlocked.is_dir()
        assert checkpoint.verify(out, progress=False)["unlisted"] == []
        assert not any(p.name.startswith(".writing") for p in out.rglob("*"))
        # --force replaces the output: its .old- folder is gone too, the live writer's still kept
        convert(hf_src, out, dtype="float32", progress=False, force=True)
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model."))
        assert left == sorted([live_dir.name, unlocked.name])
    finally:
        live.kill()
        live.wait()
    assert checkpoint.remove_stale_temps(out) == [live_dir]  # its writer is dead now


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_restore_by_layer_blocks_and_the_earlier_layout(hf_src, tmp_path, monkeypatch, tp):
    """Stacked layer tensors are written in chunks of one layer; restore fills each device's slice in blocks of
    layers (as on an accelerator; here on CPU devices, w13 a layer a block) and equals the saved arrays, sharded or
    not; a checkpoint of the earlier layout (whole-tensor chunks) restores through Orbax to the same arrays."""
    import jax
    import orbax.checkpoint as ocp
    import tensorstore as ts

    from hybrid_jax import sharding
    from hybrid_jax import weights as W
    ckpt = convert(hf_src, tmp_path / "new", dtype="float32", progress=False)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": (ckpt / checkpoint.WEIGHTS_DIR).as_uri() + "/"}).result()
    assert json.loads(kv.read("layers.w13/.zarray").result().value)["chunks"][0] == 1
    cfg = checkpoint.load_config(ckpt)
    fn = sharding.sharding_fn(sharding.mesh(tp)) if tp > 1 else None
    monkeypatch.setattr(checkpoint, "_BLOCKS_ON_CPU", True)
    layer = 4 * (cfg.ffn_dim * cfg.dim * 2 // tp)  # bytes of one layer's w13 slice
    monkeypatch.setattr(checkpoint, "READ_AHEAD_BYTES", layer)  # w13: a block a layer
    put, blocks = checkpoint._put_block, []
    monkeypatch.setattr(checkpoint, "_put_block", lambda *a: blocks.append(a[2]) or put(*a))
    _, got = checkpoint.restore(ckpt, sharding_fn=fn)
    assert sorted(set(int(l0) for l0 in blocks)) == list(range(cfg.n_layers))
    monkeypatch.setattr(checkpoint, "_writer", lambda: ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)))
    monkeypatch.setattr(checkpoint, "_save_args", lambda params: None)
    old = convert(hf_src, tmp_path / "old", dtype="float32", progress=False)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": (old / checkpoint.WEIGHTS_DIR).as_uri() + "/"}).result()
    assert json.loads(kv.read("layers.w13/.zarray").result().value)["chunks"][0] == cfg.n_layers
    _, ref = checkpoint.restore(old, sharding_fn=fn)
    for a, b in zip(jax.tree.leaves(W.to_dict(got)), jax.tree.leaves(W.to_dict(ref))):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
