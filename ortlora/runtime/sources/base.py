"""What every adapter source offers (`AdapterSource`), what `locate` returns (`Located`), and the local adapters
directory as such a source (`DirectorySource`). See the package docstring for the contract."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ortlora.adapters.cached import PEFT_FILES
from ortlora.errors import AdapterNotFound
from ortlora.runtime.adapter_dir import AdapterDirectory

REFRESH_S = 60.0  # how old a listing may be before `names()` lists again


@dataclass
class Located:
    """Adapter `name` on local disk: `path` is an `.onnx_adapter` file or a PEFT folder, which stays in place until
    `release()` (or the end of a `with` block); `version` changes exactly when the source's content does."""
    name: str
    path: Path
    version: str
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> "Located":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AdapterSource(Protocol):
    """Names -> adapters somewhere. `names()` is cheap (a listing kept in memory, renewed when older than the
    source's refresh interval or on `refresh()`); `locate(name)` brings the adapter onto local disk when needed
    and raises AdapterNotFound (AdapterUnavailable when the source did not answer) or AdapterInvalid."""
    label: str  # where the adapters are, for messages and listings: no credentials, no query string

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...  # as cheap as `names()`: no request, no scan

    def locate(self, name: str) -> Located: ...

    def refresh(self) -> None: ...


class DirectorySource:
    """`AdapterDirectory` as an `AdapterSource`: files are local already, so `locate` copies nothing and the version
    is the file's (or a PEFT folder's files') size and modification time."""

    def __init__(self, directory: AdapterDirectory, refresh_s: float = REFRESH_S):
        self.directory = directory
        self.label = "<adapters>"  # never a server path in a message
        self.refresh_s = refresh_s
        self._listed = time.monotonic()  # AdapterDirectory lists its folder when it opens
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The folder's names, scanned again only when its modification time changed (one stat per call) or the
        listing is older than `refresh_s` (a PEFT folder whose files arrived after the folder itself)."""
        with self._lock:
            if self.directory.changed() or time.monotonic() - self._listed >= self.refresh_s:
                self.refresh()
        return self.directory.names()

    def __contains__(self, name: str) -> bool:
        """Listed, or dropped into the folder since (two stats, for a name not listed)."""
        if self.directory.entry(name) is not None:
            return True
        try:
            self.directory.path(name)
        except AdapterNotFound:
            return False
        return True

    def locate(self, name: str) -> Located:
        path = self.directory.path(name)  # AdapterNotFound
        return Located(name, path, local_version(path))

    def refresh(self) -> None:
        self.directory.refresh()
        self._listed = time.monotonic()


def local_version(path: Path) -> str:
    """Inode, size and modification time of a file, or of a PEFT folder's files ('' when there is none): a file
    replaced by a rename or rewritten in place is another version."""
    files = [path / f for f in PEFT_FILES] if path.is_dir() else [path]
    parts = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        parts.append(f"{f.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if path.is_dir()
                     else f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)
