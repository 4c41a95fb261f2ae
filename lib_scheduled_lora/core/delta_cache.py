"""A byte-budgeted cache of float32 ΔW tensors that outlives one generation.

Rebuilding ΔW from its factors is a matmul per layer; keeping it between generations makes a
repeated prompt cost only memory passes. Entries are keyed by the network object (held, so its
id cannot be reused), the kohya key, the target weight (and row slice) and the device. ΔW of
IA3 and DoRA depends on the base weight, so the engine caches those only within one generation.
The cache belongs to one model: :meth:`bind` with the model's key empties it when the model
changed (another checkpoint, or a component swapped in a pipeline).

Eviction is scan-resistant. Every generation asks for the same ΔWs in the same order, so plain
LRU with a budget smaller than the generation's ΔW (a LoCon over a whole SD 1.5 UNet is 3.2 GB
in float32; the default budget is 2 GiB) evicts each entry just before it is needed again and
never hits. Here an entry may be evicted only when neither the current nor the previous
generation (:meth:`begin_generation`: every engine, so a text-encoder scope and the UNet pass
after it keep each other's entries) has used it; when no such entry is left, the new one is not
kept. The cache then holds a stable part of the working set, and that part hits every time; a
network no longer used makes room one generation later.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class DeltaCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[Hashable, tuple[object, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._model_key: object = None
        self._generation = 0
        self._used: dict[Hashable, int] = {}  # key -> the generation that last used it

    def begin_generation(self) -> None:
        """A new generation starts: what the previous ones used may now make room."""
        self._generation += 1

    def bind(self, model_key: object) -> None:
        """Say which model the next entries are for; entries of another model are dropped."""
        if model_key != self._model_key:
            self.clear()
            self._model_key = model_key

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, owner: object, key: Hashable) -> torch.Tensor | None:
        full_key = (id(owner), key)
        entry = self._entries.get(full_key)
        if entry is None:
            return None
        self._entries.move_to_end(full_key)
        self._used[full_key] = self._generation
        return entry[1]

    def put(self, owner: object, key: Hashable, delta: torch.Tensor) -> bool:
        """Keep ``delta`` if it fits, evicting least recently used entries that neither this
        generation nor the previous one used; False if it cannot be kept."""
        size = _size(delta)
        full_key = (id(owner), key)
        if full_key in self._entries:
            self._drop(full_key)
        if size > self.budget_bytes:
            return False
        if self._bytes + size > self.budget_bytes:
            recent = self._generation - 1
            stale = [k for k in self._entries if self._used.get(k, -1) < recent]  # oldest first
            room = self.budget_bytes - self._bytes
            victims = []
            for k in stale:
                if room >= size:
                    break
                victims.append(k)
                room += _size(self._entries[k][1])
            if room < size:
                return False  # evicting entries in use would only make every generation miss
            for k in victims:
                self._drop(k)
        self._entries[full_key] = (owner, delta)
        self._used[full_key] = self._generation
        self._bytes += size
        return True

    def _drop(self, full_key: Hashable) -> None:
        self._bytes -= _size(self._entries.pop(full_key)[1])
        self._used.pop(full_key, None)

    def set_budget(self, budget_bytes: int) -> None:
        """A new budget (the user changed the setting): the least recently used entries go first."""
        self.budget_bytes = int(budget_bytes)
        while self._bytes > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._used.clear()
        self._bytes = 0


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
