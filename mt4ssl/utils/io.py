"""Atomic file writes (a reader sees the old file or the new one, never a torn one) and text reads
that name the file when it is not UTF-8 text."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    On an exception the temporary file is removed and `path` is left untouched. The file gets
    the permissions a plain open() would give it (0666 minus the umask; mkstemp's are 0600, which
    would hide checkpoints and labels from the rest of a group sharing the folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError, StopIteration):  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)  # elsewhere reading the umask sets it: put it back at once
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; a file that is not UTF-8 text (binary, another encoding)
    is an InputError naming it and the first bad byte, not a UnicodeDecodeError."""
    from mt4ssl.errors import InputError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                         f"expected a text file") from None
