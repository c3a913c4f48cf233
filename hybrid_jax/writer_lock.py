"""Temporaries guarded by their writer's flock: a later process removes only those whose writer died.

The writer holds an exclusive flock for as long as it lives; the kernel releases it when the process ends, even
by SIGKILL. So a lock that can be taken without waiting means the temporary is abandoned.
"""
from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # not POSIX: no writer locks, so no temporary is ever judged abandoned
    fcntl = None


def lock_if_abandoned(path: str | os.PathLike) -> int | None:
    """An fd holding the flock on `path` where no live process holds it (its writer died), else None (a live
    writer, no such file, or no flock here). The caller removes what the lock guards, then closes the fd."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer has it
    except OSError:
        os.close(fd)
        return None
    return fd
