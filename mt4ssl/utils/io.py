"""Atomic file writes (a reader sees the old file or the new one, never a torn one) and text reads
that name the file when it is not UTF-8 text."""

from __future__ import annotations

import contextlib
import fcntl
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


@contextlib.contextmanager
def exclusive_lock(prefix: Path, what: str):
    """Hold the exclusive lock of the output `prefix` (`.NAME.lock` beside it: `.S_i_n.lock` for
    a shard, `.lr1e-3.lock` for a SUPERB run's folder); InputError when another process holds it.
    The lock is the kernel's (flock): a job that dies, even by kill -9, releases it."""
    from mt4ssl.errors import InputError

    path = prefix.with_name(f".{prefix.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"{path}: {what} is being written by another process (pid {holder}); "
                             f"two jobs must not write the same files: let that one finish (a rerun "
                             f"then keeps what it wrote) or stop it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # locked the file that is there (not one its holder removed meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: no one else can be using this file
        os.close(fd)
