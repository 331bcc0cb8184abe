"""Build once, reuse: keyed caches for what a client derives from the config.

A simulated client is served by whichever worker process Flower picks, and a deployed
SuperNode starts a new ClientApp process for every message, so each message would otherwise
decode, partition and tokenize its data again. :class:`KeyedCache` keeps built values in
memory (per process) and on disk (across processes), under a key that covers everything the
value depends on: config values and the sha256 of every file read. A changed config or data
file gives a new key, never a stale value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def file_digest(path: Path) -> str:
    """The sha256 of ``path``, computed once per (path, size, modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def cache_key(parts: Mapping[str, Any]) -> str:
    """A short stable name for ``parts`` (JSON-serialisable values)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class KeyedCache(Generic[T]):
    """Values by key, in memory (the ``max_items`` most recent) and optionally on disk.

    Disk entries are ``torch.save`` pickles under ``directory``, written atomically and
    storing their key parts, so that a file whose parts differ, or that cannot be read, is
    rebuilt rather than trusted.
    """

    def __init__(
        self, name: str, directory: Callable[[], Path] | None = None, max_items: int = 32
    ) -> None:
        self.name = name
        self.directory = directory  # called at use, so that an environment change counts
        self.max_items = max_items
        self._memory: OrderedDict[str, T] = OrderedDict()

    def get(self, parts: Mapping[str, Any], build: Callable[[], T], disk: bool = True) -> T:
        """The value for ``parts``: from memory, else from disk, else ``build()`` (stored).
        ``disk=False``: memory only (a value whose inputs ``parts`` cannot name, such as what
        a user's function returns)."""
        key = cache_key(parts)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        value = self._load(key, parts) if disk else None
        if value is None:
            value = build()
            if disk:
                self._save(key, parts, value)
        self._memory[key] = value
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)
        return value

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory() / self.name / f"{key}.pt"

    def _load(self, key: str, parts: Mapping[str, Any]) -> T | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            # Our own cache file (written by _save below), not input from elsewhere.
            stored = torch.load(path, weights_only=False)
            if stored["parts"] != json.loads(json.dumps(parts, default=str)):
                raise ValueError("key parts differ")
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt
            log.warning("ignoring cache entry %s: %s", path, exc)
            return None
        log.debug("%s: %s from disk", self.name, key)
        return stored["value"]

    def _save(self, key: str, parts: Mapping[str, Any], value: T) -> None:
        path = self._path(key)
        if path is None:
            return
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save({"parts": json.loads(json.dumps(parts, default=str)), "value": value}, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write cache entry %s: %s", path, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
