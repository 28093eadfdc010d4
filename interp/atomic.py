"""Atomic writes, the clean-up of what killed writers leave behind, and file locks.

Every file the toolkit writes goes through `atomic_write` (or `atomic_directory` for a whole
folder): the content is written to a temporary sibling named `.tmp-<pid>-<host>-<random><suffix>`,
flushed and fsynced, renamed over the target, and the directory is fsynced where the platform
allows. On any failure, KeyboardInterrupt included, the temporary file is removed. A reader
therefore sees the old file or the new one, never half of one.

A writer killed by SIGKILL cannot remove its temporary file; `remove_stale_temps` does, in the
next writer. It removes only what cannot belong to a live writer: a temporary whose process is
dead on this host, or one older than `STALE_AFTER_S` that nobody holds a lock on (every writer
holds an exclusive `flock` on its temporary file or folder while it writes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

PathLike = Union[str, Path]

TEMP_PREFIX = ".tmp-"
STALE_AFTER_S = 3600.0  # a temporary of a live process on another host is removed only after this long
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\.tmp-(\d+)-([0-9a-f]{8})-")


def temp_name(suffix: str = "") -> str:
    """A fresh temporary name that records this process and host: `.tmp-<pid>-<host>-<random><suffix>`."""
    return f"{TEMP_PREFIX}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{suffix}"


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        _fsync_path(directory)


def _fsync_path(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary sibling, which is fsynced and renamed.

    `write` receives the temporary path (for writers that open the file themselves, such as
    safetensors' `save_file` or pandas' `to_parquet`). Returns `path`.
    """
    path = Path(path)
    tmp = path.parent / temp_name(suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # tells remove_stale_temps that a live writer owns it
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Fill a temporary sibling folder inside the `with` block; on success it becomes `target`.

    `target` must not exist (take a lock around the check and the block when several processes
    may create it). On failure the temporary folder is removed.
    """
    target = Path(target)
    tmp = target.parent / temp_name()
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync_path(f)
        fsync_dir(tmp)
        os.rename(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(fd)
    fsync_dir(target.parent)


# ---------------------------------------------------------------------------- leftovers
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _locked_by_someone(path: Path) -> bool:
    """True when another open file holds a flock on `path` (a live writer)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _is_stale(path: Path, all_dead: bool, max_age: float) -> bool:
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    m = _TEMP_RE.match(path.name)
    if m is None:  # a temporary written before pid-stamped names (or by another tool): by age only
        return all_dead or age > max_age
    if _locked_by_someone(path):
        return False
    pid, host = int(m.group(1)), m.group(2)
    if all_dead or (host == _HOST and not _pid_alive(pid)):
        return True
    return age > max_age


def remove_stale_temps(
    directory: PathLike,
    all_dead: bool = False,
    legacy: Sequence[str] = (),
    max_age: float = STALE_AFTER_S,
    report: bool = True,
) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `directory`.

    Candidates are the names `temp_name` makes and those matching a `legacy` glob (names older
    versions used, in folders the toolkit owns; removed only after `max_age` unless `all_dead`).
    `all_dead=True` when the caller holds the lock every writer of `directory` takes, so no
    temporary there can belong to a live writer (a locked one is still kept). Returns what was
    removed, and says so on stderr when `report`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = {p for p in directory.glob(TEMP_PREFIX + "*") if _TEMP_RE.match(p.name)}
    for pattern in legacy:
        candidates.update(directory.glob(pattern))
    removed = []
    for path in sorted(candidates):
        if _is_stale(path, all_dead, max_age):
            _remove(path)
            removed.append(path)
    if removed and report:
        names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        print(f"[interp] removed {len(removed)} temporary file(s) left by a killed writer in {directory}: {names}",
              file=sys.stderr)
    return removed


# ---------------------------------------------------------------------------- locks
@contextlib.contextmanager
def file_lock(path: PathLike, waiting: Optional[str] = None) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if absent) for the block.

    When another process holds it, print `waiting` on stderr (if given) and wait.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
