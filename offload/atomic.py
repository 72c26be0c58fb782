"""Files written whole or not at all.

A trace, a saved chat or a session state written straight to its name is left half-written
(and then unreadable, or silently short) when the disk fills up or the process is killed
mid-write. Writing to a temporary file beside it and renaming it over the name once
complete makes the change atomic: readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`with atomic_write(path) as f: f.write(...)`: `path` gets the bytes only if the block
    ends without an error; otherwise nothing is left behind (OSError propagates)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
