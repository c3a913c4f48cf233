"""On-disk store of compiled XLA executables.

An entry is one file named by the sha256 of its key. The key covers everything that makes an executable
valid: model config, shapes, dtypes, the function's source, XLA flags, jax/jaxlib versions, platform,
device kind and count (the mesh). The file holds a magic line, a JSON header (the full key and the sha256
and length of the payload) and the payload (jax's serialized executable). On load every part is checked;
an entry that is truncated, corrupt, of another format or for another key is reported as a miss (and
deleted), so the caller compiles and stores it anew. Writes are atomic (temp file + rename). The store
is bounded: the least recently used entries go first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"HYBRID_JAX_EXEC 1\n"
DEFAULT_MAX_BYTES = 20 * 2**30


def default_dir() -> Path:
    from .default_model import cache_root
    return cache_root() / "executables"


def environment_key() -> dict[str, Any]:
    """What ties an executable to this process: versions, flags, devices."""
    import jax
    import jaxlib

    devs = jax.devices()
    return {
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "?"),
        "platform": devs[0].platform,
        "device_kind": devs[0].device_kind,
        "n_devices": len(devs),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class ExecCache:
    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.dir = Path(directory) if directory is not None else default_dir()
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # entries found but not trusted (corrupt, truncated, foreign)
        self._lock = threading.Lock()

    def path(self, key: dict) -> Path:
        return self.dir / f"{key_digest(key)}.xla"

    # ---- read ----------------------------------------------------------------------------------
    def load(self, key: dict, devices=None):
        """The deserialized executable for `key`, or None (miss, or an entry not to be trusted).

        `devices`: the devices it runs on, in the order it was compiled for (default: all of the backend's;
        give them whenever that is not every device, e.g. a mesh over some of them).
        """
        p = self.path(key)
        try:
            blob = p.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        except OSError as e:
            log.warning("exec cache: cannot read %s (%s); recompiling", p, e)
            return self._reject(p)
        try:
            payload = self._verify(blob, key)
            from jax.experimental import serialize_executable as se

            serialized, in_tree, out_tree = pickle.loads(payload)
            compiled = se.deserialize_and_load(serialized, in_tree, out_tree, execution_devices=devices)
        except Exception as e:  # noqa: BLE001 - any defect means "do not trust"
            log.warning("exec cache: rejecting entry %s (%s); recompiling", p.name, e)
            return self._reject(p)
        with self._lock:
            self.hits += 1
        try:
            os.utime(p)  # LRU bookkeeping
        except OSError:
            pass
        return compiled

    @staticmethod
    def _verify(blob: bytes, key: dict) -> bytes:
        if not blob.startswith(MAGIC):
            raise ValueError("bad magic (not an entry of this format)")
        rest = blob[len(MAGIC):]
        nl = rest.find(b"\n")
        if nl < 0:
            raise ValueError("truncated header")
        header = json.loads(rest[:nl])
        payload = rest[nl + 1:]
        if header.get("key") != json.loads(json.dumps(key, sort_keys=True, default=str)):
            raise ValueError("entry is for another key")
        if len(payload) != header.get("length"):
            raise ValueError(f"truncated payload ({len(payload)} of {header.get('length')} bytes)")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ValueError("payload checksum mismatch")
        return payload

    def _reject(self, p: Path):
        with self._lock:
            self.misses += 1
            self.rejected += 1
        try:
            p.unlink()
        except OSError:
            pass
        return None

    # ---- write ---------------------------------------------------------------------------------
    def store(self, key: dict, compiled) -> bool:
        """Serialize and store; returns False (and logs) where this backend cannot serialize."""
        try:
            from jax.experimental import serialize_executable as se

            payload = pickle.dumps(se.serialize(compiled))
        except Exception as e:  # noqa: BLE001
            log.warning("exec cache: cannot serialize executable (%s); not cached", e)
            return False
        header = {"key": json.loads(json.dumps(key, sort_keys=True, default=str)),
                  "sha256": hashlib.sha256(payload).hexdigest(), "length": len(payload)}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".xla")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
            os.replace(tmp, self.path(key))
        except OSError as e:
            log.warning("exec cache: cannot write to %s (%s); not cached", self.dir, e)
            return False
        self.evict()
        return True

    def evict(self) -> None:
        try:
            entries = sorted(self.dir.glob("*.xla"), key=lambda q: q.stat().st_mtime)
            total = sum(q.stat().st_size for q in entries)
            while entries and total > self.max_bytes:
                q = entries.pop(0)
                total -= q.stat().st_size
                q.unlink()
        except OSError:
            pass
