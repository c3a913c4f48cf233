"""On-disk store of compiled XLA executables, authenticated with a per-user secret.

An entry is one file named by the sha256 of its key. The key covers everything that makes an executable
valid: model config, shapes, dtypes, the function's source, XLA flags, jax/jaxlib versions, platform,
device kind and count (the mesh). The file is

    HYBRID_JAX_EXEC 2\\n
    {"hmac": HEX, "key": {...}, "length": N}\\n
    PAYLOAD                       (a pickle of jax's serialize_executable.serialize(compiled))

with HMAC = HMAC-SHA256(secret, MAGIC + canonical key JSON + "\\n" + PAYLOAD), the key being the one the
loader asks for: the tag binds the payload to its key, so neither can be forged or swapped. The header's
key and length only name the defect in the warning. A load checks magic, length and HMAC
(hmac.compare_digest) before anything is unpickled; a defective entry (corrupt, truncated, foreign,
forged, of another secret or format) is a miss: one warning, the file is deleted, the caller compiles and
stores it anew. Writes go to a temp file `.tmp-*.xla` in the folder, flock'ed while it is written, then
renamed into place (atomic); a new ExecCache removes the temp files whose lock is free (their writer
died: the kernel releases a dead process's locks). The store is bounded: least recently used go first.

Threat model. Unpickling a payload runs code, so only entries made with this user's secret are loaded.
The secret (32 random bytes; default $XDG_CONFIG_HOME/hybrid_jax/exec_cache.key, ~/.config when unset)
is trusted, and so is anyone who can read it (the user, root). Someone who can write the cache folder
but cannot read the secret can delete entries or make them misses (a recompile), never make one load.
As a second line, the cache refuses (one warning; this process then compiles everything and stores
nothing) a folder another user owns or that group or others can write, and a secret file that is not
the user's, is open to group or others, or is malformed.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import pickle
import secrets
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from .writer_lock import lock_if_abandoned

log = logging.getLogger(__name__)

MAGIC = b"HYBRID_JAX_EXEC 2\n"
DEFAULT_MAX_BYTES = 20 * 2**30
SECRET_BYTES = 32
TMP_PREFIX = ".tmp-"
_warned: set[str] = set()  # each reason for disabling the cache is logged once per process
_warned_lock = threading.Lock()


class Untrusted(Exception):
    """A cache folder or secret file not to be used; the message names it and the fix."""


def default_dir() -> Path:
    from .default_model import cache_root
    return cache_root() / "executables"


def default_secret_path() -> Path:
    """$XDG_CONFIG_HOME/hybrid_jax/exec_cache.key; ~/.config when XDG_CONFIG_HOME is unset or relative."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "hybrid_jax" / "exec_cache.key"


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


def canonical_key(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def key_digest(key: dict) -> str:
    return hashlib.sha256(canonical_key(key).encode()).hexdigest()


def check_folder(d: Path) -> None:
    """Raise Untrusted unless `d` (a symlink's target) is a folder of this user that no one else can write."""
    st = os.stat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"cache folder {d} is not a folder: choose another cache_dir")
    if st.st_uid != os.getuid():
        raise Untrusted(f"cache folder {d} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()}): "
                        f"choose another cache_dir")
    if st.st_mode & 0o022:
        raise Untrusted(f"cache folder {d} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                        f"run `chmod go-w {d}` or choose another cache_dir")


def read_secret(path: Path) -> bytes:
    """The secret at `path`; Untrusted unless it is this user's regular file, closed to others, 32 bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a fifo planted there must not hang us
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        data = f.read(SECRET_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
    new = "delete it (a new one is made on the next start)"
    if not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"secret {path} is not a regular file: {new}")
    if st.st_uid != os.getuid():
        raise Untrusted(f"secret {path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()}): {new}")
    if st.st_mode & 0o077:
        raise Untrusted(f"secret {path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}): {new}, "
                        f"or run `chmod 600 {path}` if no one else has read it")
    if len(data) != SECRET_BYTES:
        raise Untrusted(f"secret {path} has {len(data)} bytes, not {SECRET_BYTES}: {new}")
    return data


def load_secret(path: Path) -> bytes:
    """The secret at `path`, made when missing: 32 random bytes, mode 0600, in a folder made 0700.

    Made as a complete temp file, then hard-linked into place: of processes starting at once, one link
    wins and the others read its (whole) file."""
    try:
        return read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    new = secrets.token_bytes(SECRET_BYTES)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(fd)
        os.link(tmp, path)
        return new
    except FileExistsError:
        return read_secret(path)
    finally:
        os.unlink(tmp)


def _same_file(fd: int, path: Path | str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class ExecCache:
    """`enabled` is False (and `disabled_reason` says why) where the folder or the secret is not to be
    trusted: then load() always misses and store() writes nothing. `secret` (bytes) or `secret_path`
    replace the default secret file (default_secret_path())."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 secret: bytes | None = None, secret_path: str | os.PathLike | None = None):
        if secret is not None and len(secret) < 16:
            raise ValueError(f"secret must be at least 16 bytes, got {len(secret)}")
        self.dir = Path(directory) if directory is not None else default_dir()
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # entries found but not trusted (corrupt, truncated, foreign, forged)
        self._lock = threading.Lock()
        self.disabled_reason = self._open(secret, Path(secret_path) if secret_path else default_secret_path())
        self.enabled = self.disabled_reason is None
        if self.enabled:
            self.remove_stale_temps()
        else:
            with _warned_lock:
                first = self.disabled_reason not in _warned
                _warned.add(self.disabled_reason)
            if first:
                log.warning("exec cache disabled for this process: %s", self.disabled_reason)

    def _open(self, secret: bytes | None, secret_path: Path) -> str | None:
        """Check the folder (made 0700 when missing) and get the secret; the reason not to use them, if any."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_folder(self.dir)
        except Untrusted as e:
            return str(e)
        except OSError as e:
            return f"cannot use cache folder {self.dir} ({e}): choose another cache_dir"
        try:
            self._secret = secret if secret is not None else load_secret(secret_path)
        except Untrusted as e:
            return str(e)
        except OSError as e:
            return (f"cannot read or make secret {secret_path} ({e}): "
                    f"fix that folder's permissions or set XDG_CONFIG_HOME")
        return None

    def path(self, key: dict) -> Path:
        return self.dir / f"{key_digest(key)}.xla"

    def _mac(self, canon: bytes, payload) -> bytes:
        h = hmac.new(self._secret, MAGIC, hashlib.sha256)
        h.update(canon)
        h.update(b"\n")
        h.update(payload)
        return h.hexdigest().encode()

    # ---- read ----------------------------------------------------------------------------------
    def load(self, key: dict, devices=None):
        """The deserialized executable for `key`, or None (miss, or an entry not to be trusted).

        `devices`: the devices it runs on, in the order it was compiled for (default: all of the backend's;
        give them whenever that is not every device, e.g. a mesh over some of them).
        """
        if not self.enabled:
            with self._lock:
                self.misses += 1
            return None
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
            payload = self._verify(blob, key)  # before anything is unpickled
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

    def _verify(self, blob: bytes, key: dict) -> memoryview:
        if not blob.startswith(MAGIC):
            raise ValueError("bad magic (another format or version)")
        nl = blob.find(b"\n", len(MAGIC))
        if nl < 0:
            raise ValueError("truncated header")
        header = json.loads(blob[len(MAGIC):nl])
        payload = memoryview(blob)[nl + 1:]
        canon = canonical_key(key)
        if header.get("key") != json.loads(canon):
            raise ValueError("entry is for another key")
        if len(payload) != header.get("length"):
            raise ValueError(f"truncated payload ({len(payload)} of {header.get('length')} bytes)")
        if not hmac.compare_digest(self._mac(canon.encode(), payload), str(header.get("hmac")).encode()):
            raise ValueError("HMAC mismatch (written with another secret, or tampered with)")
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
        """Serialize and store; returns False (and logs) where this backend cannot serialize or write."""
        if not self.enabled:
            return False
        try:
            from jax.experimental import serialize_executable as se

            payload = pickle.dumps(se.serialize(compiled))
        except Exception as e:  # noqa: BLE001
            log.warning("exec cache: cannot serialize executable (%s); not cached", e)
            return False
        canon = canonical_key(key)
        header = {"key": json.loads(canon), "length": len(payload),
                  "hmac": self._mac(canon.encode(), payload).decode()}
        try:
            fd, tmp = self._new_temp()
            try:
                with os.fdopen(fd, "wb") as f:  # closing it releases the lock: after the rename
                    f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
                    f.write(payload)
                    f.flush()
                    os.replace(tmp, self.path(key))
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as e:
            log.warning("exec cache: cannot write to %s (%s); not cached", self.dir, e)
            return False
        self.evict()
        return True

    def _new_temp(self) -> tuple[int, str]:
        """A new temp file in the folder, flock'ed while it is written (remove_stale_temps skips it)."""
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=TMP_PREFIX, suffix=".xla")
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, tmp):
                return fd, tmp
            os.close(fd)  # another process's remove_stale_temps took it before our lock
        raise OSError("temp files removed as they are made")

    def remove_stale_temps(self) -> int:
        """Remove temp files whose writer died (no flock on them); those being written are kept."""
        n = 0
        for p in self.dir.glob(TMP_PREFIX + "*.xla"):
            fd = lock_if_abandoned(p)
            if fd is None:
                continue
            try:
                if _same_file(fd, p):
                    p.unlink()
                    n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return n

    def evict(self) -> None:
        entries = []
        for q in self.dir.glob("*.xla"):
            if q.name.startswith("."):  # temp files: their writers' business
                continue
            try:
                st = q.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, q))
        entries.sort(key=lambda e: e[0])
        total = sum(e[1] for e in entries)
        for _, size, q in entries:
            if total <= self.max_bytes:
                break
            try:
                q.unlink()
            except OSError:
                pass
            total -= size
