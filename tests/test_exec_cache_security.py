"""The disk cache of executables loads only entries made with this user's secret: forged, swapped and foreign
entries are rejected before anything is unpickled and rebuilt; a folder others can write and a secret file
others can read disable it; temp files of dead writers are removed, those being written are kept."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_params, make_hf_model
from hybrid_jax import exec_cache as xc
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate

MAX = 32
PROMPT = [5, 17, 42, 99, 7]
SECRET = bytes(range(32))
LOGGER = "hybrid_jax.exec_cache"


# ---- helpers -------------------------------------------------------------------------------------
def engine(cfg, params, cache_dir) -> Engine:
    # no background bucket compiles: every run asks the cache for the same three executables
    return Engine(cfg, params, max_seq_len=MAX, cache_dir=cache_dir, background_compiles=False)


def workload(e: Engine) -> tuple[list[int], list[int]]:
    greedy = generate(e, PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
    sampled = generate(e, PROMPT, max_new_tokens=6, temperature=0.9, top_k=40, seed=3, ignore_eos=True).token_ids
    e.wait_background()
    return greedy, sampled


@dataclasses.dataclass
class Clean:
    cfg: LlamaConfig
    params: object
    cache: Path  # the entries of a clean run, made with the secret under `xdg`
    xdg: Path
    names: dict  # spec -> entry file name
    keys: dict  # spec -> the runtime's key
    greedy: list
    sampled: list

    def copy(self, dst: Path) -> Path:
        shutil.copytree(self.cache, dst)
        return dst

    def run(self, cache_dir: Path) -> tuple[tuple[list[int], list[int]], dict, Engine]:
        e = engine(self.cfg, self.params, cache_dir)
        try:
            return workload(e), e.stats(), e
        finally:
            e.close()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Clean:
    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    xdg, cache = tmp_path_factory.mktemp("cfg"), tmp_path_factory.mktemp("xc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(xdg))
        e = engine(cfg, p, cache)
        try:
            greedy, sampled = workload(e)
            rt = e.runtime
            specs = [("decode", k, s) for k in rt.decode_kv_buckets for s in (False, True)] + [rt.universal_spec]
            keys = {s: rt.cache_key(s) for s in specs}
            names = {s: rt.exec_cache.path(k).name for s, k in keys.items()}
            assert e.stats()["compiles"] == 3 and sorted(q.name for q in cache.iterdir()) == sorted(names.values())
        finally:
            e.close()
    assert greedy != sampled
    return Clean(cfg, p, cache, xdg, names, keys, greedy, sampled)


@pytest.fixture
def as_user(clean, monkeypatch):
    """This test's process has the clean run's secret (the default location, through XDG_CONFIG_HOME)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(clean.xdg))


def split(path: Path) -> tuple[bytes, dict, bytes]:
    b = path.read_bytes()
    i = b.index(b"\n") + 1
    j = b.index(b"\n", i) + 1
    return b[:i], json.loads(b[i:j]), b[j:]


def forge(path: Path, magic: bytes, header: dict, payload: bytes) -> None:
    """Write an entry as an attacker who knows the format but not the secret: the checksums an attacker can
    compute are recomputed, the rest is copied."""
    header = dict(header, length=len(payload))
    if "sha256" in header:
        header["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(magic + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)


class Plant:
    """A pickle that makes a folder when it is loaded (stands for any code an attacker would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture(scope="module")
def small():
    """A tiny compiled executable (for the ExecCache-level tests)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda x: x * 3 + 1).lower(jnp.zeros(4, jnp.float32)).compile()


KEY = {"test": "small"}


def check_small(c: xc.ExecCache) -> None:
    """`c` loads the small executable, and it runs."""
    import jax
    import jax.numpy as jnp

    ex = c.load(KEY, jax.devices()[:1])
    assert ex is not None and np.asarray(ex(jnp.ones(4, jnp.float32))).tolist() == [4.0] * 4


# ---- forged, swapped, foreign entries ------------------------------------------------------------------
def test_forged_pickle_entry_is_rejected_before_unpickling(clean, as_user, tmp_path, caplog):
    d = clean.copy(tmp_path / "xc")
    marker = tmp_path / "pwned"
    for name in clean.names.values():
        magic, header, _ = split(d / name)
        forge(d / name, magic, header, pickle.dumps(Plant(marker)))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    out, st, _ = clean.run(d)
    assert not marker.exists(), "a forged entry was unpickled"
    assert (st["cache_rejected"], st["cache_hits"], st["compiles"]) == (3, 0, 3)
    assert out == (clean.greedy, clean.sampled)
    assert len(warnings_of(caplog)) == 3 and all("HMAC" in w for w in warnings_of(caplog))
    out, st, _ = clean.run(d)  # the rebuilt entries are trusted
    assert (st["cache_hits"], st["cache_rejected"], st["compiles"]) == (3, 0, 0) and not marker.exists()


def test_swapped_greedy_and_sampling_payloads_are_rejected_and_rebuilt(clean, as_user, tmp_path):
    d = clean.copy(tmp_path / "xc")
    (g, s) = [d / n for spec, n in clean.names.items() if spec[0] == "decode"]
    mg, hg, pg = split(g)
    ms, hs, ps = split(s)
    # everything but the key moves with the payload (tag, length); the checksums are recomputed
    forge(g, mg, {**hs, "key": hg["key"]}, ps)
    forge(s, ms, {**hg, "key": hs["key"]}, pg)
    out, st, _ = clean.run(d)
    assert (st["cache_rejected"], st["compiles"], st["cache_hits"]) == (2, 2, 1)
    assert out == (clean.greedy, clean.sampled)
    out, st, _ = clean.run(d)
    assert (st["cache_hits"], st["cache_rejected"], st["compiles"]) == (3, 0, 0)
    assert out == (clean.greedy, clean.sampled)


def test_entries_of_another_secret_are_rejected(clean, tmp_path, monkeypatch):
    d = clean.copy(tmp_path / "xc")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-user-config"))
    out, st, _ = clean.run(d)
    assert (st["cache_rejected"], st["cache_hits"], st["compiles"]) == (3, 0, 3)
    assert out == (clean.greedy, clean.sampled)
    c = xc.ExecCache(d, secret=SECRET)  # a third secret, given explicitly
    assert all(c.load(k) is None for k in clean.keys.values()) and c.rejected == 3 and c.hits == 0


def test_entry_format_tag_and_old_format(small, tmp_path, caplog):
    c = xc.ExecCache(tmp_path / "xc", secret=SECRET)
    assert c.store(KEY, small)
    p = c.path(KEY)
    magic, header, payload = split(p)
    assert magic == b"HYBRID_JAX_EXEC 2\n" and len(header["hmac"]) == 64 and "sha256" not in header
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(c.dir.stat().st_mode) == 0o700
    check_small(xc.ExecCache(c.dir, secret=SECRET))
    other = xc.ExecCache(c.dir, secret=b"x" * 32)
    assert other.load(KEY) is None and other.rejected == 1 and not p.exists()
    # an entry of the previous format (a plain sha256, which anyone can compute) is a miss
    c.store(KEY, small)
    _, header, payload = split(p)
    old = {"key": header["key"], "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    forge(p, b"HYBRID_JAX_EXEC 1\n", old, payload)
    caplog.clear()
    c2 = xc.ExecCache(c.dir, secret=SECRET)
    assert c2.load(KEY) is None and c2.rejected == 1 and "bad magic" in warnings_of(caplog)[0]
    # whole files swapped between keys: each is for another key
    c2.store(KEY, small)
    c2.store({"test": "other"}, small)
    a, b = c2.path(KEY), c2.path({"test": "other"})
    ab, bb = a.read_bytes(), b.read_bytes()
    a.write_bytes(bb)
    b.write_bytes(ab)
    assert c2.load(KEY) is None and c2.load({"test": "other"}) is None and c2.rejected == 3


# ---- the cache folder --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777, 0o720])
def test_folder_writable_by_others_disables_the_cache(small, tmp_path, caplog, mode):
    d = tmp_path / "shared"
    xc.ExecCache(d, secret=SECRET).store(KEY, small)  # a valid entry
    d.chmod(mode)
    before = listing(d)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    c = xc.ExecCache(d, secret=SECRET)
    assert not c.enabled and str(d) in c.disabled_reason and f"chmod go-w {d}" in c.disabled_reason
    assert c.load(KEY) is None and c.hits == 0 and c.rejected == 0  # not even read
    assert c.store({"test": "new"}, small) is False
    assert listing(d) == before
    c2 = xc.ExecCache(d, secret=SECRET)  # warned once per process
    assert not c2.enabled and c2.load(KEY) is None
    w = warnings_of(caplog)
    assert len(w) == 1 and str(d) in w[0] and "chmod go-w" in w[0] and "\n" not in w[0]


def test_folder_of_another_user_disables_the_cache(small, tmp_path, caplog, monkeypatch):
    d = tmp_path / "theirs"
    xc.ExecCache(d, secret=SECRET).store(KEY, small)
    before = listing(d)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1000)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    c = xc.ExecCache(d, secret=SECRET)
    assert not c.enabled and "owned by uid" in c.disabled_reason and str(d) in c.disabled_reason
    assert c.load(KEY) is None and c.store({"test": "new"}, small) is False
    monkeypatch.undo()
    assert listing(d) == before and len(warnings_of(caplog)) == 1


def test_symlink_to_a_writable_folder_disables_the_cache(small, tmp_path, caplog):
    real = tmp_path / "real"
    real.mkdir()
    real.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(real)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    c = xc.ExecCache(link, secret=SECRET)
    assert not c.enabled and c.store(KEY, small) is False and list(real.iterdir()) == []
    assert len(warnings_of(caplog)) == 1
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o700)
    (tmp_path / "oklink").symlink_to(ok)
    assert xc.ExecCache(tmp_path / "oklink", secret=SECRET).enabled


def test_made_folder_is_private_and_parents_default(tmp_path):
    d = tmp_path / "a" / "b" / "xc"
    assert xc.ExecCache(d, secret=SECRET).enabled
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_runtime_with_a_world_writable_cache_compiles_everything_and_writes_nothing(clean, as_user, tmp_path,
                                                                                     caplog):
    d = clean.copy(tmp_path / "xc")
    d.chmod(0o777)
    before = listing(d)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    out, st, e = clean.run(d)
    assert not e.runtime.exec_cache.enabled and str(d) in e.runtime.exec_cache.disabled_reason
    assert (st["compiles"], st["cache_hits"], st["cache_rejected"]) == (3, 0, 0)
    assert out == (clean.greedy, clean.sampled)
    assert listing(d) == before
    assert len(warnings_of(caplog)) == 1


# ---- the secret --------------------------------------------------------------------------------------
def test_missing_secret_is_made_private(small, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert xc.default_secret_path() == tmp_path / "cfg" / "hybrid_jax" / "exec_cache.key"
    c = xc.ExecCache(tmp_path / "xc")
    key = tmp_path / "cfg" / "hybrid_jax" / "exec_cache.key"
    assert c.enabled and key.stat().st_size == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert [p.name for p in key.parent.iterdir()] == ["exec_cache.key"]  # no temp file left
    c.store(KEY, small)
    check_small(xc.ExecCache(tmp_path / "xc"))  # the same secret next time
    check_small(xc.ExecCache(tmp_path / "xc", secret=key.read_bytes()))
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert xc.default_secret_path() == tmp_path / "home" / ".config" / "hybrid_jax" / "exec_cache.key"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/path")  # ignored, as XDG says
    assert xc.default_secret_path() == tmp_path / "home" / ".config" / "hybrid_jax" / "exec_cache.key"


def test_secret_readable_by_others_is_refused(small, tmp_path, caplog):
    key = tmp_path / "exec_cache.key"
    key.write_bytes(SECRET)
    key.chmod(0o644)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    c = xc.ExecCache(tmp_path / "xc", secret_path=key)
    assert not c.enabled and c.store(KEY, small) is False and list((tmp_path / "xc").iterdir()) == []
    w = warnings_of(caplog)
    assert len(w) == 1 and str(key) in w[0] and f"chmod 600 {key}" in w[0] and "delete" in w[0]
    assert key.read_bytes() == SECRET  # left for the user to fix


@pytest.mark.parametrize("data", [b"", b"short", SECRET + b"x"])
def test_secret_of_the_wrong_length_is_refused(tmp_path, caplog, data):
    key = tmp_path / "exec_cache.key"
    key.write_bytes(data)
    key.chmod(0o600)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    c = xc.ExecCache(tmp_path / "xc", secret_path=key)
    assert not c.enabled and f"has {len(data)} bytes" in c.disabled_reason
    assert len(warnings_of(caplog)) == 1


def test_secret_of_another_user_is_refused(tmp_path, monkeypatch):
    key = tmp_path / "exec_cache.key"
    key.write_bytes(SECRET)
    key.chmod(0o600)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1000)
    with pytest.raises(xc.Untrusted, match="owned by uid"):
        xc.read_secret(key)


def test_concurrent_starts_share_one_secret(tmp_path):
    key = tmp_path / "cfg" / "hybrid_jax" / "exec_cache.key"
    n = 8
    barrier = threading.Barrier(n)
    caches = [None] * n

    def start(i):
        barrier.wait()
        caches[i] = xc.ExecCache(tmp_path / f"xc{i}", secret_path=key)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c.enabled for c in caches)
    assert {c._secret for c in caches} == {key.read_bytes()} and len(key.read_bytes()) == 32
    assert [p.name for p in key.parent.iterdir()] == ["exec_cache.key"]


# ---- temp files ----------------------------------------------------------------------------------------
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
os.write(fd, b"half an entry")
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_temp_of_a_killed_writer_is_removed_and_a_live_one_kept(tmp_path):
    import fcntl

    d = tmp_path / "xc"
    d.mkdir(mode=0o700)
    held = d / ".tmp-held.xla"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        orphan = d / ".tmp-orphan.xla"  # nobody holds its lock: a writer that died
        orphan.write_bytes(b"half")
        mine = d / ".tmp-mine.xla"  # held by an open file of this process (its own open file description)
        mine.write_bytes(b"half")
        f = open(mine, "rb")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        entry = d / "0123.xla"
        entry.write_bytes(b"not a temp file")
        assert xc.ExecCache(d, secret=SECRET).enabled
        assert held.exists() and mine.exists() and entry.exists() and not orphan.exists()
        f.close()
        proc.kill()  # SIGKILL: no cleanup of its own; the kernel drops its lock
        proc.wait(timeout=30)
        xc.ExecCache(d, secret=SECRET)
        assert not held.exists() and not mine.exists() and entry.exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_store_holds_its_temp_file_locked_until_the_rename(small, tmp_path, monkeypatch):
    d = tmp_path / "xc"
    c = xc.ExecCache(d, secret=SECRET)
    real_replace, seen = os.replace, []

    def replace(src, dst):
        xc.ExecCache(d, secret=SECRET)  # another process starting now: its cleanup must leave our temp file
        seen.append(Path(src).exists())
        real_replace(src, dst)

    monkeypatch.setattr(xc.os, "replace", replace)
    assert c.store(KEY, small)
    monkeypatch.undo()
    assert seen == [True]
    assert [p.name for p in d.iterdir()] == [c.path(KEY).name]
    check_small(xc.ExecCache(d, secret=SECRET))


def test_lru_eviction_skips_temp_files(small, tmp_path):
    import fcntl

    d = tmp_path / "xc"
    c = xc.ExecCache(d, secret=SECRET)
    keys = [{"test": i} for i in range(3)]
    c.store(keys[0], small)
    size = c.path(keys[0]).stat().st_size
    c.max_bytes = int(2.5 * size)
    busy = d / ".tmp-busy.xla"  # being written by someone: neither counted nor evicted
    busy.write_bytes(b"\0" * (10 * size))
    f = open(busy, "rb")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        os.utime(c.path(keys[0]), (1e9, 1e9))
        c.store(keys[1], small)
        os.utime(c.path(keys[1]), (1e9 + 10, 1e9 + 10))
        assert c.path(keys[0]).exists() and c.path(keys[1]).exists()
        c.store(keys[2], small)
        assert not c.path(keys[0]).exists() and c.path(keys[1]).exists() and c.path(keys[2]).exists()
        assert busy.exists()
    finally:
        f.close()
