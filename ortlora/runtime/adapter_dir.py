"""An adapters directory: names -> `.onnx_adapter` files (or PEFT adapter folders) inside one folder, every path
confined to it.

Files are registered by file stem (`acme-support.onnx_adapter` -> `acme-support`), PEFT folders by folder name,
without being opened, so thousands cost nothing until used; one dropped into the folder later is found on first
use. A PEFT folder is converted on first use and cached in `.ortlora-cache/` (see `ortlora.adapters.cached`). Names
are a conservative charset with no separators, and a path (given by a caller or found by discovery) must resolve,
symlinks followed, to a regular file inside the folder. Listing costs no file I/O per name: the folder is scanned
when it opens and again only when its own modification time says that entries came or went (`changed`), so a
listing of thousands stays one stat. This class only names and places files: what an adapter is, loads and holds is
`ortlora.runtime.adapters.Adapters`' business (through `ortlora.runtime.registry.AdapterRegistry`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from ortlora.adapters.cached import is_peft_folder
from ortlora.adapters.onnx_adapter import SUFFIX
from ortlora.errors import AdapterError, AdapterExists, AdapterInvalid, AdapterNotFound, StorageFull
from ortlora.fileutil import locked_temp_file, remove_unlocked_temps

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: "$" would let "name\n" through
_CHUNK = 1 << 20
CACHE = ".ortlora-cache"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
log = logging.getLogger("ortlora.adapters")
# a folder changed this recently may change again within its timestamp's granularity (git's "racy" entries): its
# next listing scans again rather than trusting an unchanged modification time
RACY_NS = 2_000_000_000


def check_name(name: object) -> str:
    """`name` if it is a valid adapter name, else AdapterInvalid saying why."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise AdapterInvalid(f"invalid adapter name {str(name)[:140]!r}: use 1-128 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit, without the {SUFFIX} suffix")
    return name


class AdapterDirectory:
    """Thread-safe map of adapter names to files inside `root`."""

    def __init__(self, root: str | Path, reserved: tuple[str, ...] = ()):
        try:
            self.root = Path(root).resolve(strict=True)
        except OSError:
            raise AdapterError(f"adapters directory {root}: no such folder") from None
        if not self.root.is_dir():
            raise AdapterError(f"adapters directory {root}: not a folder")
        self.reserved = set(reserved)  # e.g. the base model's name
        self._paths: dict[str, Path] = {}
        self._hidden: set[str] = set()  # unregistered by a caller: not rediscovered from the folder
        self._owned: set[str] = set()  # written by `upload`: deleted with the registration
        self._added: set[str] = set()  # registered by a caller (kept by refresh)
        self._lock = threading.Lock()
        self.skipped: list[str] = []
        self.unreadable: str | None = None  # why the last scan failed (the folder was removed, replaced, ...)
        self._scanned_mtime: int | None = None  # the folder's st_mtime_ns when it was last scanned
        self._racy = True
        # uploads a killed process left half-written: every temporary whose writer is gone, however recent (a
        # live upload, here or in another process sharing the folder, holds its temporary's lock)
        self.removed = remove_unlocked_temps(self.root)
        self._discover()

    def _discover(self) -> None:
        found, skipped = {}, []
        mtime = self._mtime()
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:  # removed, replaced by a file, unreadable: only what still resolves is served
            if self.unreadable is None:
                log.warning("cannot read the adapters folder %s: %s", self.root, exc.strerror)
            self.unreadable = exc.strerror or type(exc).__name__
            entries = []
        else:
            self.unreadable = None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.name.endswith(SUFFIX):
                name = entry.name[: -len(SUFFIX)]
            elif is_peft_folder(entry.path):
                name = entry.name
            else:
                continue
            try:
                check_name(name)
                if name in self.reserved:
                    raise AdapterInvalid(f"{name!r} is the base model's name")
                found[name] = self._inside(Path(entry.path))
            except AdapterError as exc:
                skipped.append(f"{entry.name}: {exc}")
        self._paths.update(found)
        self.skipped = skipped
        self._scanned_mtime = mtime
        self._racy = mtime is None or time.time_ns() - mtime < RACY_NS

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.root).st_mtime_ns
        except OSError:
            return None

    def changed(self) -> bool:
        """Whether entries may have come or gone since the last scan (one stat of the folder itself)."""
        return self._racy or self._mtime() != self._scanned_mtime

    def refresh(self) -> None:
        """Rescan the folder: files added since are registered, files gone are forgotten (names unregistered by a
        caller stay hidden; names registered by a caller under another file are kept)."""
        for removed in remove_unlocked_temps(self.root):  # a sweep while running, not only at start-up
            log.warning("removed %s: left by an interrupted upload", removed.name)
        with self._lock:
            own = {n: p for n, p in self._paths.items() if n in self._added}
            self._paths = {}
            self._discover()
            for name in self._hidden:
                self._paths.pop(name, None)
            if self.unreadable is not None:
                own = {n: p for n, p in own.items() if _exists(p)}
            self._paths.update(own)

    def _inside(self, path: Path) -> Path:
        """`path` resolved (symlinks followed); AdapterInvalid unless it is a regular file inside the root."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise AdapterInvalid(f"{path.name}: no such file in the adapters directory") from None
        if not real.is_relative_to(self.root):
            raise AdapterInvalid(f"{path.name}: resolves outside the adapters directory")
        if not (real.is_file() or is_peft_folder(real)):
            raise AdapterInvalid(f"{path.name}: not a regular file or a PEFT adapter folder")
        return real

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._paths)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def entry(self, name: str) -> tuple[str, bool] | None:
        """(path relative to the folder, registered by a caller rather than found in the folder) of a listed name,
        from memory: no file I/O (`path` checks the file)."""
        with self._lock:
            path = self._paths.get(name)
            added = name in self._added
        if path is None:
            return None
        text, prefix = str(path), str(self.root) + os.sep
        return (text[len(prefix):] if text.startswith(prefix) else self.relative(path)), added

    def path(self, name: str) -> Path:
        """The file of adapter `name`, checked again now (it may have been replaced by a symlink since)."""
        with self._lock:
            path = self._paths.get(name)
            if path is None and name not in self._hidden and NAME.fullmatch(name) and name not in self.reserved:
                for candidate in (self.root / f"{name}{SUFFIX}", self.root / name):  # dropped in after start-up
                    try:
                        path = self._paths[name] = self._inside(candidate)
                        break
                    except AdapterInvalid:
                        pass
            if path is None:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
        try:
            return self._inside(path)
        except AdapterInvalid:
            raise AdapterNotFound(f"adapter {name!r} does not exist") from None

    def resolve(self, path: str) -> Path:
        """A caller's `path` (relative to, or absolute inside, the folder) as a checked `.onnx_adapter` file."""
        if not isinstance(path, str) or not path or "\x00" in path or not _encodable(path):
            raise AdapterInvalid("path must be a non-empty string of Unicode text")
        real = self._inside(self.root / path)  # an absolute `path` replaces root: still checked to lie inside
        if not (real.name.endswith(SUFFIX) or real.is_dir()):
            raise AdapterInvalid(f"{Path(path).name}: not an {SUFFIX} file or a PEFT adapter folder")
        return real

    @property
    def cache(self) -> Path:
        """Where PEFT folders' conversions are kept."""
        return self.root / CACHE

    def claim(self, name: str) -> None:
        """Raise unless `name` is free to register (valid, not reserved, not taken)."""
        check_name(name)
        if name in self.reserved:
            raise AdapterExists(f"{name!r} is the base model's name")
        with self._lock:
            if name in self._paths:
                raise AdapterExists(f"adapter {name!r} already exists (DELETE it first)")

    def add(self, name: str, path: Path) -> None:
        """Register checked file `path` as `name` (the caller claimed the name and checked the file)."""
        with self._lock:
            self._paths[name] = path
            self._hidden.discard(name)
            self._added.add(name)

    def upload(self, name: str, stream: BinaryIO, max_bytes: int, check) -> Path:
        """Write `stream` as `<name>.onnx_adapter` in the folder: written to a temporary file, `check(tmp)` (raises
        to refuse), then renamed into place. On any failure nothing is left: no file, no name."""
        self.claim(name)
        target = self.root / f"{name}{SUFFIX}"
        if target.exists() or target.is_symlink():
            raise AdapterExists(f"adapter {name!r} already exists in the adapters directory")
        size = 0
        try:
            with locked_temp_file(target) as (tmp, f):
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise AdapterInvalid(f"upload exceeds the {max_bytes}-byte limit")
                    f.write(chunk)
                f.flush()
                self._commit(name, target, tmp, check)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            raise StorageFull(f"no room in the adapters folder for adapter {name!r} ({exc.strerror} after "
                              f"{size} bytes): nothing was kept") from None
        return target

    def _commit(self, name: str, target: Path, tmp: Path, check) -> None:
        """Check the written temporary and register it (it is renamed into place when this returns)."""
        check(tmp)
        with self._lock:  # the name may have been taken while the file was written
            if name in self._paths:
                raise AdapterExists(f"adapter {name!r} already exists (DELETE it first)")
            self._paths[name] = target  # before the rename: a lookup never sees a file without its entry
            self._hidden.discard(name)
            self._owned.add(name)
            self._added.add(name)

    def remove(self, name: str) -> None:
        """Unregister `name`; a file uploaded through `upload` is deleted, one placed by hand stays (hidden)."""
        self.path(name)  # AdapterNotFound
        with self._lock:
            self._paths.pop(name, None)
            self._hidden.add(name)
            self._added.discard(name)
            if name in self._owned:
                self._owned.discard(name)
                (self.root / f"{name}{SUFFIX}").unlink(missing_ok=True)  # loaded copies are private: requests finish


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _encodable(text: str) -> bool:
    """Text a file name can hold (a lone surrogate cannot)."""
    try:
        os.fsencode(text)
    except UnicodeError:
        return False
    return True
