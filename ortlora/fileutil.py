"""Atomic outputs: write into a temporary sibling, rename into place only when complete.

Temporary names are `.<target name>.<random>.tmp` (files and folders) and `.<target name>.old-<pid>` (a folder
being replaced); `remove_stale_temps` removes what an interrupted process left under those names.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".tmp"
# tempfile's random part is 8 characters of [a-z0-9_]; the `.old-<pid>` folder is atomic_dir's previous target
_TEMP_NAME = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|old-\d+)$")


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
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        if not _TEMP_NAME.match(entry.name) or entry.is_symlink():
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
