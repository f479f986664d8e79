"""Atomic outputs: write into a temporary sibling, rename into place only when complete.

Temporary names are `.<target name>.<random>.tmp` (files and folders) and `.<target name>.old-<pid>` (a folder
being replaced); `remove_stale_temps` removes what an interrupted process left under those names. A temporary
written by `locked_temp_file` is flock'ed by its writer for its whole life, so `remove_unlocked_temps` removes a
dead writer's at once (a restart right after a kill), however recent, and never a live one's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: unlocked temporaries are removed by age instead
    fcntl = None

TEMP_SUFFIX = ".tmp"
# tempfile's random part is 8 characters of [a-z0-9_]; the `.old-<pid>` folder is atomic_dir's previous target
_TEMP_NAME = re.compile(r"\..+\.(?:[a-z0-9_]{8}\.tmp|old-\d+)")  # fullmatch


def _read_umask() -> int:
    """The process's umask, read once at import (reading it means setting it: not something to do per write
    while other threads create files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def temp_dir(target: str | Path) -> Path:
    """A new empty folder beside `target`, named so that `remove_stale_temps` recognizes it."""
    target = Path(target).absolute()
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))


def output_problem(target: str | Path) -> str | None:
    """Why `target` cannot be created (a file where a folder of its path should be), or None. Permissions and
    special filesystems (/proc) are left to the write itself, which names `target` when it fails."""
    blocking = _blocking_file(Path(target).absolute())
    return None if blocking is None else f"{target}: {blocking} is a file, not a folder"


def _blocking_file(target: Path) -> Path | None:
    for parent in target.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


# errors of a write that name no file (or the temporary): they are about the output being written
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def _naming(target: Path, tmp: Path | None = None) -> Iterator[None]:
    """Re-raise an OSError of creating or writing `target`'s temporary as the same error about `target` itself:
    the user named `target`, never `.<name>.<random>.tmp` (type and errno stay, for callers that map them)."""
    try:
        yield
    except OSError as exc:
        name = exc.filename
        about_tmp = name is not None and tmp is not None and (Path(name) == tmp or tmp in Path(name).parents)
        if tmp is not None and not about_tmp and not (name is None and exc.errno in _WRITE_ERRNOS):
            raise  # an input's error (or one of the caller's own): it names its file already
        blocking = _blocking_file(target) if tmp is None else None
        if blocking is not None:
            raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a folder", str(target)) from exc
        verb = "cannot create it" if tmp is None else "cannot write it"
        raise type(exc)(exc.errno, f"{verb}: {exc.strerror or exc}", str(target)) from exc


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target`, on any error it is removed."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists")
    tmp = temp_dir(target)
    try:
        with _naming(target, tmp):
            yield tmp
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700: give the folder the mode mkdir would
            if not target.exists():
                tmp.rename(target)
            elif _exchange(tmp, target):  # one step: readers see the old folder or the new one, never neither
                shutil.rmtree(tmp, ignore_errors=True)  # tmp is the old folder now
            else:  # no atomic exchange here: two renames, the old folder put back if the second fails
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
                try:
                    tmp.rename(target)
                except BaseException:
                    old.rename(target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or file system cannot
    (nothing changed then)."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _renameat2 = libc.renameat2
                _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            except (OSError, AttributeError):
                _renameat2 = False
    if not _renameat2:
        return False
    at_cwd = -100  # AT_FDCWD: the paths are absolute
    if _renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


_renameat2 = None


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is renamed onto `target`, on any error removed."""
    target = Path(target).absolute()
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _naming(target, tmp):
            yield tmp
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600: give the file the mode open() would
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked_temp_file(target: str | Path) -> Iterator[tuple[Path, BinaryIO]]:
    """`atomic_file` whose temporary is yielded open for writing (with its path) and locked (flock) from its
    creation until it is renamed onto `target` or removed: while its writer lives, no sweep removes it."""
    target = Path(target).absolute()
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    tmp = Path(name)
    f = os.fdopen(fd, "wb")
    try:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield tmp, f
        f.flush()
        os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes it 0600: give the file the mode open() would
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        f.close()  # the lock goes with it


def remove_unlocked_temps(folder: str | Path, fallback_grace: float = 300.0) -> list[Path]:
    """Remove the temporary files in `folder` whose writer is gone: nobody holds their lock (see
    `locked_temp_file`). One younger than a second is left alone (its writer may be between creating and locking
    it); without flock (Windows) temporaries older than `fallback_grace` seconds go. Returns what was removed."""
    if fcntl is None:  # pragma: no cover
        return remove_stale_temps(folder, grace=fallback_grace)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
            if time.time() - os.fstat(fd).st_mtime >= 1.0:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, atomically (values JSON does not know, such as paths, are written as text)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def remove_stale_temps(folder: str | Path, grace: float = 3600.0) -> list[Path]:
    """Remove the temporary files and folders that `atomic_file` / `atomic_dir` leave in `folder` when the process
    writing them is killed, if nothing in them changed for `grace` seconds (a write still running keeps touching
    its temporary). Nothing else is touched: other names, symlinks and subfolders' contents stay. Returns what was
    removed."""
    folder = Path(folder)
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name) or entry.is_symlink():
            continue
        path = Path(entry.path)
        try:
            if now - _newest_mtime(path) < grace:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # its writer finished (renamed it) or removed it meanwhile
            continue
        removed.append(path)
    return removed


def _newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and, for a folder, of everything below it (without following links)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest
