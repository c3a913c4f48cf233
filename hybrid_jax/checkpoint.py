"""Orbax save/restore of a converted model: DIR/config.json, DIR/weights (Orbax), DIR/tokenizer files.

`save` writes into a temporary sibling folder and renames it into place at the end, so a failure leaves
no partial checkpoint; it refuses to replace an existing folder unless `force=True`.

Integrity: config.json's "files" maps every other file of the folder to its size and sha256, and
"config_sha256" hashes config.json's own content. `restore` compares every file's size (stat only) before
Orbax opens any, and the stored shapes and dtypes with config.json's; `verify` (or `restore(verify=True)`)
hashes every file. Damage is reported as one-line `CheckpointError`s naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import types
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from . import weights as W
from .config import LlamaConfig
from .writer_lock import lock_if_abandoned

try:
    import fcntl
except ImportError:  # not POSIX: no writer locks, so stale temporaries are never removed
    fcntl = None

FORMAT = "hybrid_jax"
# 2: layer matrices stored output-major ([out dims..., in dims...], weights.py); version 1 stored them
# input-major. A version-1 checkpoint is refused with the command that converts its source again.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_DIR = "weights"
FILES_KEY = "files"  # config.json: {relative path: {"size": bytes, "sha256": hex}} of every other file
CONFIG_HASH_KEY = "config_sha256"  # config.json: sha256 of its own content without this key (_config_hash)
# Held (flock) by the process writing a temporary folder; removed before the folder is renamed into place.
LOCK_FILE = ".writing.lock"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

_log = logging.getLogger(__name__)
_warned_no_manifest: set[str] = set()


class CheckpointError(ValueError):
    """A damaged or inconsistent checkpoint folder; the message is one line naming the file and the fix."""


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def _writer():
    """Orbax's writer without its default zstd: every start reads all the weights, and decompressing them made
    the restore 2x slower on 2 cores (SmolLM2 1.3 s against 0.6 s) for 22-40% less disk."""
    import orbax.checkpoint as ocp
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


# A stacked layer tensor [L, ...] is written in chunks of one layer (split further to at most this many bytes), so
# that `restore` reads it a layer at a time: the host never holds more than a few layers' slices, where a
# whole-tensor chunk (the earlier layout, still read) is staged whole (a 70B's w13 is 75 GB).
LAYER_CHUNK_BYTES = 64 << 20
# The bytes of layers read at once (a block; the next block is read while one is placed on the device), and the
# tensors restored at once.
READ_AHEAD_BYTES = 128 << 20
RESTORE_WORKERS = 4
_BLOCKS_ON_CPU = False  # tests set it: the block path runs on CPU devices too


def _save_args(params: dict):
    import orbax.checkpoint as ocp
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ocp.SaveArgs(chunk_byte_size=LAYER_CHUNK_BYTES, shard_axes=(0,))
        if path[0].key == "layers" else ocp.SaveArgs(), params)


def _leaf_name(path) -> str:
    return ".".join(str(k.key) for k in path)  # Orbax's key of a nested dict's leaf


def _layer_chunked(wdir: Path, target: dict) -> bool:
    """Whether every stacked layer tensor of the checkpoint is stored in chunks of one layer (`_save_args`)."""
    import tensorstore as ts
    kv = ts.KvStore.open({"driver": "ocdbt", "base": wdir.as_uri() + "/"}).result()
    for path, _ in jax.tree_util.tree_flatten_with_path(target["layers"])[0]:
        name = "layers." + _leaf_name(path)
        got = kv.read(name + "/.zarray").result()
        if got.state != "value" or json.loads(got.value).get("chunks", [None])[0] != 1:
            return False
    return True


# buf[l0 : l0 + len(x)] = x on buf's device, in place (buf donated)
_put_block = jax.jit(lambda buf, x, l0: jax.lax.dynamic_update_slice_in_dim(buf, x, l0, 0), donate_argnums=0)


def _restore_by_layer(wdir: Path, target: dict) -> dict:
    """The arrays of `target` (ShapeDtypeStructs with shardings) read with TensorStore from the checkpoint's
    Orbax layout, RESTORE_WORKERS tensors at a time. On an accelerator each device's slice of a stacked layer
    tensor larger than READ_AHEAD_BYTES is allocated on the device and filled in blocks of layers of at most that
    size, the next block read while one is placed, so the host holds at most 2 blocks a worker; other tensors
    (and every tensor on CPU devices) are read as one slice a device. Devices holding the same slice share its
    reads. A failed read names its tensor (CheckpointError by the caller)."""
    import numpy as np
    import tensorstore as ts

    base = {"driver": "ocdbt", "base": wdir.as_uri() + "/"}
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)

    def one(path, sds):
        name = _leaf_name(path)
        try:
            arr = ts.open({"driver": "zarr", "kvstore": {**base, "path": name + "/"}}, context=ctx,
                          open=True).result()
            groups: dict[tuple, list] = {}  # the devices that hold each slice
            for dev, index in sds.sharding.addressable_devices_indices_map(sds.shape).items():
                groups.setdefault(tuple(sl.indices(n)[:2] for sl, n in zip(index, sds.shape)), []).append(dev)
            shards = {}
            for key, devs in groups.items():
                index = tuple(slice(a, b) for a, b in key)
                local = tuple(b - a for a, b in key)
                layer_bytes = int(np.prod(local[1:])) * np.dtype(sds.dtype).itemsize
                # CPU devices' buffers are host memory: a block-by-block fill would only add copies there
                if path[0].key != "layers" or local[0] * layer_bytes <= READ_AHEAD_BYTES or \
                        devs[0].platform == "cpu" and not _BLOCKS_ON_CPU:
                    host = arr[index].read().result()
                    for d in devs:
                        shards[d] = jax.device_put(host, d)
                    del host
                    continue
                per = max(1, READ_AHEAD_BYTES // max(1, layer_bytes))  # layers a block
                starts = list(range(0, local[0], per))

                def read(l0, key=key, index=index, per=per, n=local[0], arr=arr):
                    return arr[(slice(key[0][0] + l0, key[0][0] + min(n, l0 + per)),) + index[1:]].read()
                bufs = {d: jnp.zeros(local, sds.dtype, device=d) for d in devs}
                pending = read(starts[0])
                for i, l0 in enumerate(starts):
                    host = pending.result()
                    if i + 1 < len(starts):
                        pending = read(starts[i + 1])
                    for d in devs:
                        bufs[d] = _put_block(bufs[d], jax.device_put(host, d), np.int32(l0))
                    del host
                shards.update(bufs)
        except Exception as e:
            raise _TensorReadError(name) from e
        return jax.make_array_from_single_device_arrays(sds.shape, sds.sharding,
                                                        [shards[d] for d in sds.sharding.addressable_devices])

    # tensors in parallel (reads and copies release the GIL): at most RESTORE_WORKERS x 2 blocks on the host
    with ThreadPoolExecutor(RESTORE_WORKERS, thread_name_prefix="hybrid_jax-restore") as pool:
        out = list(pool.map(lambda leaf: one(*leaf), leaves))
    return jax.tree_util.tree_unflatten(treedef, out)


class _TensorReadError(Exception):
    def __init__(self, name: str):
        super().__init__(f"Error reading \"{name}/\"")  # the form _tensor_of finds a tensor's name in


def _meta(path: str | os.PathLike) -> dict | None:
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_checkpoint(path: str | os.PathLike) -> bool:
    return _meta(path) is not None


def is_current(path: str | os.PathLike) -> bool:
    """A checkpoint of this version of the format (one this code restores)."""
    meta = _meta(path)
    return meta is not None and meta.get("format_version") == FORMAT_VERSION


def has_manifest(path: str | os.PathLike) -> bool:
    """config.json lists the folder's files (checkpoints written before the manifest existed do not)."""
    meta = _meta(path)
    return meta is not None and FILES_KEY in meta


def is_intact(path: str | os.PathLike) -> bool:
    """A current checkpoint with a manifest whose files all exist with their recorded sizes (stat only)."""
    try:
        p = Path(path).absolute()
        load_config(p)
        return _check_sizes(p, _read_meta(p)) is not None
    except (OSError, ValueError):
        return False


def fix_command(path: str | os.PathLike, meta: dict | None = None) -> str:
    """The command that writes the checkpoint at `path` again, from the source config.json records."""
    if meta is None:
        try:
            meta = json.loads((Path(path) / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            meta = {}
    conv = meta.get("converted_from") if isinstance(meta, dict) else None
    src = conv.get("path") if isinstance(conv, dict) and isinstance(conv.get("path"), str) else "SRC"
    return f"python -m convert --src {src} --out {Path(path).absolute()} --force"


def _fix(path, meta=None) -> str:
    return f"convert it again with `{fix_command(path, meta)}`"


# ---- hashing ---------------------------------------------------------------------------------------

def _sha256(path: Path, bar=None) -> str:
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL: files hash in parallel threads
            if bar is not None:
                bar.update(n)
    return h.hexdigest()


def _hash_files(root: Path, rels: list[str], progress: bool | None = None, desc: str = "hashing") -> dict[str, str]:
    """relative path -> sha256 hex, files hashed in parallel threads; a tqdm bar on stderr when `progress`
    (None: when stderr is a terminal)."""
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    total = sum((root / r).stat().st_size for r in rels)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(rels)))) as pool:
            return dict(zip(rels, pool.map(lambda r: _sha256(root / r, bar), rels)))


def _list_files(root: Path) -> list[str]:
    """Every file under `root` but config.json and a writer's lock file, as sorted posix relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in filenames:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel not in (CONFIG_FILE, LOCK_FILE, LOCK_FILE + ".new"):
                out.append(rel)
    return sorted(out)


def _config_hash(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != CONFIG_HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- writer locks and stale temporaries ------------------------------------------------------------

def _temp_name_re(out: Path) -> re.Pattern:
    # tempfile.mkdtemp's names: the prefix, then 8 characters of [a-z0-9_]
    return re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-[a-z0-9_]{8}")


def _locked_tempdir(out: Path, kind: str) -> tuple[Path, int | None]:
    """A new `.{name}.{kind}-XXXXXXXX` folder beside `out` holding LOCK_FILE, flock'ed by this process (the fd)."""
    d = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))
    if fcntl is None:
        return d, None
    new = d / (LOCK_FILE + ".new")
    fd = None
    try:
        fd = os.open(new, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(new, d / LOCK_FILE)  # the lock file appears already locked: a scan never takes a live one
    except OSError:  # a filesystem without flock: the folder is never judged stale
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(new)
        return d, None
    return d, fd


def _drop_lock_file(d: Path) -> None:
    """Unlink d's lock file right before d is renamed into place, so the checkpoint holds only its own files.

    The fd keeps the lock until after the rename; a scan in between finds no lock file and keeps the folder.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d / LOCK_FILE)


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def remove_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove the `.{name}.tmp-*` / `.{name}.old-*` folders beside `out` whose writer died (killed, power loss).

    A folder is removed only when this process can take the flock on its LOCK_FILE, which the writing
    process holds for as long as it lives; folders without a lock file (not ours, or a writer in its last
    step) are kept. Returns the folders removed.
    """
    if fcntl is None:
        return []
    out = Path(out).absolute()
    pattern = _temp_name_re(out)
    try:
        entries = [e for e in out.parent.iterdir() if pattern.fullmatch(e.name)]
    except OSError:
        return []
    removed = []
    for d in entries:
        if d.is_symlink() or not d.is_dir():
            continue
        fd = lock_if_abandoned(d / LOCK_FILE)
        if fd is None:  # its writer is alive, or it is not ours
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
                _log.info("removed %s, left by an interrupted write of %s", d, out)
        finally:
            os.close(fd)
    return removed


# ---- save ------------------------------------------------------------------------------------------

def save(out_dir: str | os.PathLike, cfg: LlamaConfig, params: dict, write_tokenizer: Callable[[Path], None] | None = None,
         force: bool = False, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically. `params` is the nested dict of `weights.shapes` (numpy or jax arrays)."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"output folder {out} already exists (pass --force / force=True to replace it)")
    W.check(cfg, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp, lock = _locked_tempdir(out, "tmp")
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the renamed folder should get the usual mode
        _writer().save(tmp / WEIGHTS_DIR, params, save_args=_save_args(params))  # synchronous
        tok_record = {}
        if write_tokenizer is not None:
            write_tokenizer(tmp)
            if any((tmp / f).is_file() for f in TOKENIZER_FILES):
                from .tokenizer import RECORD_KEY, check_fast
                tok_record = {RECORD_KEY: check_fast(tmp)}
        rels = _list_files(tmp)
        sums = _hash_files(tmp, rels, progress=False)  # just written: read back from the page cache
        files = {r: {"size": (tmp / r).stat().st_size, "sha256": sums[r]} for r in rels}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict(), **(extra or {}),
                **tok_record, FILES_KEY: files}
        meta[CONFIG_HASH_KEY] = _config_hash(meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            old, old_lock = _locked_tempdir(out, "old")
            try:
                os.rename(out, old / "x")
                try:
                    _drop_lock_file(tmp)
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old / "x", out)  # the folder is replaced only on success
                    raise
            finally:
                if out.exists():
                    shutil.rmtree(old, ignore_errors=True)
                _unlock(old_lock)
        else:
            _drop_lock_file(tmp)
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)
    return out


# ---- config.json -----------------------------------------------------------------------------------

def _read_meta(p: Path) -> dict:
    """config.json as a dict; CheckpointError when it is not valid JSON. {} when absent."""
    f = p / CONFIG_FILE
    try:
        text = f.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {f} ({e}): {_fix(p, {})}") from e
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}): restore the file or {_fix(p, {})}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} holds a {type(meta).__name__}, not an object: {_fix(p, {})}")
    return meta


def _type_ok(v, t) -> bool:
    """`v` (parsed JSON) fits the annotation `t` (LlamaConfig's field types)."""
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if origin is tuple:
        return isinstance(v, list) and all(_type_ok(x, args[0]) for x in v)
    if dataclasses.is_dataclass(t):
        hints = typing.get_type_hints(t)
        return isinstance(v, dict) and set(v) == set(hints) and all(_type_ok(v[k], hints[k]) for k in hints)
    return True


def _type_name(t) -> str:
    if t is type(None):
        return "null"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(t):
        return "an object {" + ", ".join(f.name for f in dataclasses.fields(t)) + "}"
    return getattr(t, "__name__", str(t))


def _config_from(meta: dict, p: Path) -> LlamaConfig:
    where = p / CONFIG_FILE
    fix = _fix(p, meta)
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{where} lacks the 'model' object: {fix}")
    fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    hints = typing.get_type_hints(LlamaConfig)
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in model]
    if missing:
        raise CheckpointError(f"{where} lacks the field(s) {', '.join('model.' + n for n in missing)}: {fix}")
    unknown = sorted(set(model) - set(fields))
    if unknown:
        raise CheckpointError(f"{where} has unknown field(s) {', '.join('model.' + n for n in unknown)} "
                              f"(written by another version of hybrid_jax?): {fix}")
    for n, v in model.items():
        if not _type_ok(v, hints[n]):
            shown = json.dumps(v)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CheckpointError(f"{where}: field model.{n} = {shown} is not {_type_name(hints[n])}: {fix}")
    try:
        return LlamaConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {' '.join(str(e).split())}: {fix}") from e


def _manifest(meta: dict, p: Path) -> dict[str, dict] | None:
    """config.json's file list, validated; None for a checkpoint written before the list existed."""
    files = meta.get(FILES_KEY)
    if files is None:
        return None
    where = p / CONFIG_FILE
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: '{FILES_KEY}' is not an object: {_fix(p, meta)}")
    for rel, e in files.items():
        parts = rel.split("/")
        if (rel.startswith("/") or any(x in ("", ".", "..") for x in parts) or rel == CONFIG_FILE
                or not isinstance(e, dict) or not _type_ok(e.get("size"), int)
                or not isinstance(e.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", e["sha256"])):
            raise CheckpointError(f"{where}: the entry {rel!r} of '{FILES_KEY}' is malformed: {_fix(p, meta)}")
    return files


def tokenizer_record(path: str | os.PathLike) -> dict | None:
    """The converter's check of the fast tokenizer (tokenizer.check_fast), or None for an older checkpoint."""
    from .tokenizer import RECORD_KEY

    rec = _read_meta(Path(path)).get(RECORD_KEY)
    return rec if isinstance(rec, dict) else None


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any(Path(path, f).is_file() for f in TOKENIZER_FILES)


def load_config(path: str | os.PathLike) -> LlamaConfig:
    """The model config of a checkpoint; CheckpointError (one line, naming config.json and the field) when it
    is unreadable or a field is missing, unknown or of the wrong type."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model folder {p} does not exist")
    meta = _read_meta(p)
    if meta.get("format") != FORMAT:
        if (p / WEIGHTS_DIR).is_dir():  # Orbax weights: a checkpoint whose config.json is missing or damaged
            what = f"has no {CONFIG_FILE}" if not meta else f"has a {CONFIG_FILE} without \"format\": \"{FORMAT}\""
            raise CheckpointError(f"checkpoint {p.absolute()} {what}: {_fix(p, meta)}")
        raise ValueError(f"{p} is not a hybrid_jax checkpoint (no config.json with format {FORMAT!r}); "
                         f"convert it first with `python -m convert --src {p} --out DIR`")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        src = (meta.get("converted_from") or {}).get("path") or "SRC"
        raise ValueError(f"{p} is a hybrid_jax checkpoint of format version {version}; this version of hybrid_jax "
                         f"reads version {FORMAT_VERSION} (the layer matrices' layout changed): convert the source "
                         f"again with `python -m convert --src {src} --out {p} --force`")
    _manifest(meta, p)
    return _config_from(meta, p)


# ---- checks ----------------------------------------------------------------------------------------

def _damaged(p: Path, problems: list[str], meta: dict) -> CheckpointError:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return CheckpointError(f"checkpoint {p} is damaged: {'; '.join(problems[:3])}{more}; {_fix(p, meta)}")


def _check_sizes(p: Path, meta: dict) -> dict | None:
    """Every manifest file exists with its recorded size (stat only); the manifest, or None if there is none."""
    files = _manifest(meta, p)
    if files is None:
        return None
    problems = []
    for rel, e in files.items():
        try:
            st = os.stat(p / rel)
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        except OSError as err:
            problems.append(f"{rel} cannot be read ({err.strerror})")
            continue
        if st.st_size != e["size"]:
            what = "truncated" if st.st_size < e["size"] else "too long"
            problems.append(f"{rel} is {what} ({st.st_size} bytes, {e['size']} written)")
    if problems:
        raise _damaged(p, problems, meta)
    return files


def _warn_no_manifest(p: Path, meta: dict) -> None:
    if str(p) in _warned_no_manifest:
        return
    _warned_no_manifest.add(str(p))
    warnings.warn(f"checkpoint {p} has no file manifest (written before hybrid_jax recorded one), so damaged "
                  f"files cannot be detected; {_fix(p, meta)} to add one", stacklevel=3)


def verify(path: str | os.PathLike, progress: bool | None = None) -> dict:
    """Hash every file of a checkpoint and compare it with config.json's manifest.

    Returns {"path", "files", "bytes", "seconds", "unlisted"} (unlisted: files present but not in the
    manifest, which nothing reads); raises CheckpointError naming the first bad files and the fix, also
    for a checkpoint without a manifest. `progress`: a tqdm bar on stderr (None: when stderr is a terminal).
    """
    p = Path(path).absolute()
    t0 = time.perf_counter()
    load_config(p)
    meta = _read_meta(p)
    files = _check_sizes(p, meta)
    if files is None:
        raise CheckpointError(f"checkpoint {p} has no file manifest (written before hybrid_jax recorded one), so "
                              f"it cannot be verified; {_fix(p, meta)} to add one")
    sums = _hash_files(p, list(files), progress=progress, desc=f"verifying {p.name}")
    bad = [f"{rel} does not match its sha256 (changed after it was written)"
           for rel, e in files.items() if sums[rel] != e["sha256"]]
    if CONFIG_HASH_KEY in meta and meta[CONFIG_HASH_KEY] != _config_hash(meta):
        bad.append(f"{CONFIG_FILE} does not match its {CONFIG_HASH_KEY} (edited or damaged)")
    if bad:
        raise _damaged(p, bad, meta)
    unlisted = [r for r in _list_files(p) if r not in files]
    return {"path": str(p), "files": len(files), "bytes": sum(e["size"] for e in files.values()),
            "seconds": time.perf_counter() - t0, "unlisted": unlisted}


_verify = verify  # restore's `verify` argument hides the function there


# the config.json fields each stored tensor's shape comes from (weights.shapes)
_FIELDS = {"embed": "vocab_size, dim", "final_norm": "dim", "lm_head": "dim, vocab_size, tie_embeddings",
           "layers.attn_norm": "n_layers, dim", "layers.mlp_norm": "n_layers, dim",
           "layers.wqkv": "n_layers, n_kv_heads, n_heads, head_dim, dim",
           "layers.wo": "n_layers, dim, n_kv_heads, n_heads, head_dim",
           "layers.w13": "n_layers, ffn_dim, dim", "layers.w2": "n_layers, dim, ffn_dim"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def _check_stored(p: Path, cfg: LlamaConfig, dtype: str, meta: dict, source: str) -> None:
    """Orbax stored the shapes `cfg` implies, in config.json's `dtype` (checked before any tensor is read)."""
    import numpy as np

    fix = _fix(p, meta)
    try:
        stored = _flat(dict(_checkpointer().metadata(p / WEIGHTS_DIR).item_metadata.tree))
    except Exception as e:
        raise CheckpointError(f"cannot read the tensor list of checkpoint {p} ({_reason(e)}): {fix}") from e
    specs = _flat(W.specs(cfg))
    floats = _flat(W.float_mask(cfg))
    want = {name: shape for name, (shape, _) in specs.items()}
    for name, (shape, kind) in specs.items():
        if name not in stored:
            raise CheckpointError(f"tensor {name!r} is not in {p / WEIGHTS_DIR}, but {source} implies it "
                                  f"({_FIELDS.get(name, 'model')}): {fix}")
        got = tuple(stored[name].shape)
        if got != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {p / WEIGHTS_DIR} has shape {got}, but {source} implies "
                                  f"{tuple(shape)} (from {_FIELDS.get(name, 'model')}): {fix}")
        expect = dtype if floats[name] else kind  # a float tensor in config.json's dtype; quantized arrays as stored
        if np.dtype(stored[name].dtype) != jnp.dtype(expect):
            what = f"{CONFIG_FILE} says dtype {dtype}" if floats[name] else f"quantization {cfg.quant} stores {kind}"
            raise CheckpointError(f"tensor {name!r} in {p / WEIGHTS_DIR} is stored as {np.dtype(stored[name].dtype)}, "
                                  f"but {what}: {fix}")
    extra = sorted(set(stored) - set(want))
    if extra:
        raise CheckpointError(f"{p / WEIGHTS_DIR} holds tensor(s) {extra} that {source} does not imply "
                              f"(tie_embeddings is {cfg.tie_embeddings}): {fix}")


def _reason(e: BaseException) -> str:
    """The most specific one-line message of an Orbax / TensorStore exception chain."""
    best, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if str(e).strip():
            best = e
        e = e.__cause__ or e.__context__
    msg = " ".join(str(best).split()) or type(best).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _tensor_of(e: BaseException) -> str | None:
    """The tensor an Orbax / TensorStore read failed on, when its messages name it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        m = re.search(r'Error reading "([^"/]+)/', str(e)) or re.search(r"'path': '([^'/]+)/'", str(e))
        if m:
            return m.group(1)
        e = e.__cause__ or e.__context__
    return None


def _close_orbax_reads() -> None:
    """Close the read coroutines a failed Orbax restore leaves suspended in its stopped event loop.

    Left alone, each is closed whenever it is collected (at exit at the latest) and turns that close into an
    Exception, which Python prints as "Exception ignored in" with a 60-line TensorStore spec; the failure is
    already reported, so they are closed here, their errors dropped. Runs on the failure path only.
    """
    import gc

    for o in gc.get_objects():
        if (isinstance(o, types.CoroutineType) and o.cr_code.co_name == "_read_array_index_and_device_put"
                and o.cr_frame is not None and not o.cr_running):
            try:
                o.close()
            except BaseException:  # orbax's `except BaseException: raise Exception(...)`
                pass


# ---- restore ---------------------------------------------------------------------------------------

def restore(path: str | os.PathLike, cfg: LlamaConfig | None = None, sharding_fn=None, dtype: str | None = None,
            verify: bool = False, progress: bool | None = None) -> tuple[LlamaConfig, W.Weights]:
    """Restore weights straight onto devices (into their shards when `sharding_fn` gives shardings).

    Before Orbax reads anything: every file of config.json's manifest must exist with its recorded size, and
    the stored shapes / dtypes must be the ones the config implies. `verify=True` also hashes every file
    first (see `verify`; `progress` as there). Failures are one-line `CheckpointError`s.
    """
    p = Path(path).absolute()
    source = "the given config" if cfg is not None else CONFIG_FILE
    conf = load_config(p)
    cfg = cfg or conf
    meta = _read_meta(p)
    if verify:
        _verify(p, progress=progress)
    elif _check_sizes(p, meta) is None:
        _warn_no_manifest(p, meta)
    _check_stored(p, cfg, conf.dtype, meta, source)
    if sharding_fn is None:  # onto the default device (Orbax gives host arrays without a sharding)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_fn = lambda name, shape: one  # noqa: E731
    target = W.to_dict(W.abstract(cfg, sharding_fn))
    try:
        if _layer_chunked(p / WEIGHTS_DIR, target):
            params = _restore_by_layer(p / WEIGHTS_DIR, target)
        else:  # the earlier layout (whole-tensor chunks): Orbax reads every tensor at once
            params = _checkpointer().restore(p / WEIGHTS_DIR, target)
    except MemoryError:
        raise
    except Exception as e:
        if re.search(r"RESOURCE_EXHAUSTED|out of memory", f"{e} {_reason(e)}", re.I):
            raise  # not damage
        _close_orbax_reads()
        tensor = _tensor_of(e)
        what = f"tensor {tensor!r} of checkpoint {p}" if tensor else f"the weights of checkpoint {p}"
        raise CheckpointError(f"cannot read {what} ({_reason(e)}): its files are damaged; "
                              f"{_fix(p, meta)}") from e
    if dtype is not None and dtype != cfg.dtype:
        cfg = cfg.replace(dtype=dtype)
        # the float tensors (a quantized matrix's codes and float16 scales stay as stored)
        params = jax.tree.map(lambda a, f: a.astype(dtype) if f else a, params, W.float_mask(cfg))
    return cfg, W.from_dict(params)
