"""Finding the network files that prompt tags name, without ever leaving the network folders.

Like the WebUI, a tag names a file by its stem (``<lora:wday:...>`` → ``wday.safetensors``
anywhere below the folder). Names are only ever looked up in an index built by walking the
folder, never joined onto a path, so ``<lora:../../secret:1>`` cannot reach outside it; symbolic
links that resolve outside the folder are left out of the index.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lib_scheduled_lora.core.networks.base import Network
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.tags import NetworkTag, find_tags
from lib_scheduled_lora.errors import MAX_TEXT, MissingNetworkError, elide, excerpt

NETWORK_SUFFIXES = (".safetensors",)


@dataclass
class LoadedNetworks:
    """Networks read from their files, kept (least recently used first out) so that repeated
    generations do not read and parse them again; a file changed on disk is read again.

    One object per (file, ``dyn=``): the engine's ΔW cache keys on the object, so a rank-limited
    copy and the full network never mix.
    """

    max_networks: int = 16
    _entries: OrderedDict[str, tuple[tuple[int, int], Network, dict[int, Network]]] = field(
        default_factory=OrderedDict
    )

    def load(self, path: str | os.PathLike, name: str, dyn: int | None = None) -> Network:
        key = str(path)
        stat = os.stat(key)
        stamp = (stat.st_mtime_ns, stat.st_size)
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            entry = (stamp, load_network(key, name=name), {})
            self._entries[key] = entry
            while len(self._entries) > self.max_networks:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        _, network, cut = entry
        if dyn is None:
            return network
        if dyn not in cut:
            cut[dyn] = network.rank_limited(dyn)
        return cut[dyn]

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True)
class NetworkLibrary:
    """The network files below one or more folders, by name (file stem), and those loaded so far."""

    files: dict[str, Path]
    loaded: LoadedNetworks = field(default_factory=LoadedNetworks, compare=False)

    @classmethod
    def scan(cls, folders: Iterable[str | os.PathLike]) -> NetworkLibrary:
        files: dict[str, Path] = {}
        for folder in folders:
            root = Path(folder).resolve()
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() not in NETWORK_SUFFIXES or not path.is_file():
                    continue
                real = path.resolve()
                if not real.is_relative_to(root):
                    continue  # a link pointing outside the folder
                files.setdefault(path.stem, real)
        return cls(files)

    def find(self, name: str, tag_text: str | None = None) -> Path:
        path = self.files.get(name)
        if path is None:
            where = excerpt(tag_text or f"<lora:{name}>", 7)  # long tags and names elided
            known = elide(", ".join(sorted(self.files)[:8]) or "none", MAX_TEXT)
            raise MissingNetworkError(f"{where}: no network named {elide(name)!r} (known: {known})")
        return path


    def load(self, tag: NetworkTag, tag_text: str | None = None) -> Network:
        """The network a tag names (rank-limited by its ``dyn=``), read once and kept."""
        return self.loaded.load(self.find(tag.name, tag_text), tag.name, tag.dyn)


def strip_network_tags(prompt: str) -> str:
    """The prompt as the text encoder should see it: network tags removed, like the host does."""
    text = prompt
    for match in reversed(find_tags(prompt)):
        text = text[: match.start] + text[match.end :]
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")

