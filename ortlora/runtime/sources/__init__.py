"""Adapter sources: where a registry finds adapters by name, on local disk or by URL.

The interface every source offers (`AdapterSource`), so that a registry treats a folder and a bucket alike:

    source.label          where the adapters are, for messages (no credentials, no query string)
    source.names()        the names it holds: a listing kept in memory, renewed when older than its refresh
                          interval (never a scan per request); cheap, downloads nothing
    source.locate(name)   -> Located(name, path, version): the adapter on local disk (an `.onnx_adapter` file or a
                          PEFT folder), downloaded into the cache first when needed; `path` stays in place until
                          `release()` / the end of a `with` block; `version` changes exactly when the content does
                          (ETag, generation, Hub blob id, else last-modified, with the size; local files: size and
                          mtime). Raises AdapterNotFound, AdapterUnavailable (a subclass: the source did not answer,
                          refused access, or failed) or AdapterInvalid (not an adapter, truncated, over the
                          download limit), each naming the adapter.
    source.refresh()      list again now

How sources are named (`open_source`), in `--adapters` or per registration:

    /srv/adapters                  a local folder (today's AdapterDirectory): files by stem, PEFT folders by name
    s3://bucket/adapters/          every <name>.onnx_adapter and PEFT folder <name>/ under the prefix (also gs://,
                                   hf://org/repo[@revision]/path, file://)
    https://host/adapters.toml     an index file (.toml or .json, any scheme or a local path): name -> URL
    s3://bucket/acme.onnx_adapter  one adapter, named by the file's stem
    open_source(url, cache, name="acme")   one adapter at `url` under `name` (a registration); a URL without the
                                   `.onnx_adapter` suffix is a PEFT folder (adapter_config.json + safetensors)

A registry holds one `AdapterCache` (a bounded folder that survives restarts) and one `Backends` (the fsspec
filesystems, with timeouts and storage options) for all its URL sources, and loads an adapter with

    with source.locate(name) as found:        # held while it is read, so the cache cannot evict it meanwhile
        adapter = read(found.path)            # PEFT folders: ortlora.adapters.cached.convert_cached
    # found.version: a reload is needed when locate later reports another version

The backends are optional packages: http(s) needs aiohttp (`ortlora[http]`), s3 s3fs (`ortlora[s3]`), gs gcsfs
(`ortlora[gcs]`), hf huggingface_hub (`ortlora[hf]`); a missing one is an AdapterInvalid naming the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ortlora.adapters.onnx_adapter import SUFFIX
from ortlora.errors import AdapterError
from ortlora.runtime.adapter_dir import AdapterDirectory
from ortlora.runtime.sources.base import REFRESH_S, AdapterSource, DirectorySource, Located, local_version
from ortlora.runtime.sources.cache import AdapterCache, CacheStats
from ortlora.runtime.sources.fetch import Backends, Target, is_url, safe_url
from ortlora.runtime.sources.remote import RemoteAdapter, RemoteIndex, RemotePrefix

__all__ = ["AdapterCache", "AdapterSource", "Backends", "CacheStats", "DirectorySource", "Located", "RemoteAdapter",
           "RemoteIndex", "RemotePrefix", "Target", "is_url", "local_version", "open_source", "safe_url"]
INDEX_SUFFIXES = (".json", ".toml")


def open_source(spec: str, cache: AdapterCache | None = None, *, name: str | None = None,
                backends: Backends | None = None, storage_options: Mapping[str, Mapping[str, Any]] | None = None,
                reserved: tuple[str, ...] = (), refresh_s: float = REFRESH_S) -> AdapterSource:
    """The source `spec` names (see the module docstring). URL sources need `cache`; `backends` (or
    `storage_options` to build one) is shared by the sources of one registry. A listing source lists once now:
    a source that cannot be listed raises here."""
    remote = is_url(spec)
    if not remote and name is None:
        path = Path(spec)
        if path.is_dir():
            return DirectorySource(AdapterDirectory(path, reserved), refresh_s)
        if path.suffix.lower() not in INDEX_SUFFIXES:
            what = "no such folder" if not path.exists() else "not a folder, an index file (.json, .toml) or a URL"
            raise AdapterError(f"adapter source {spec}: {what}")
    if cache is None:
        raise AdapterError(f"adapter source {safe_url(spec)} needs an adapter cache folder")
    backends = backends or Backends(storage_options)
    if name is not None:
        if not remote:
            raise AdapterError("a registration by path names a file inside the adapters directory, not a source")
        return RemoteAdapter(name, spec, cache, backends)
    stem = safe_url(spec).rstrip("/").rsplit("/", 1)[-1]
    if stem.lower().endswith(INDEX_SUFFIXES):
        return RemoteIndex(spec, cache, backends, reserved, refresh_s)
    if stem.endswith(SUFFIX):
        return RemoteAdapter(stem[: -len(SUFFIX)], spec, cache, backends)
    return RemotePrefix(spec, cache, backends, reserved, refresh_s)
