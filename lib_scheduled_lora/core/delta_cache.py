"""A byte-budgeted cache of float32 ΔW tensors that outlives one generation.

Rebuilding ΔW from its factors is a matmul per layer; keeping it between generations makes a
repeated prompt cost only memory passes. Entries are keyed by the network object (held, so its
id cannot be reused), the kohya key, the target weight (and row slice) and the device. ΔW of
IA3 and DoRA depends on the base weight, so the engine caches those only within one generation.
The cache belongs to one model: :meth:`bind` with the model's key empties it when the model
changed (another checkpoint, or a component swapped in a pipeline).
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
        entry = self._entries.get((id(owner), key))
        if entry is None:
            return None
        self._entries.move_to_end((id(owner), key))
        return entry[1]

    def put(self, owner: object, key: Hashable, delta: torch.Tensor) -> bool:
        """Keep ``delta`` if it fits, evicting least recently used entries; False if it cannot."""
        size = delta.numel() * delta.element_size()
        if size > self.budget_bytes:
            return False
        full_key = (id(owner), key)
        if full_key in self._entries:
            self._bytes -= _size(self._entries.pop(full_key)[1])
        while self._bytes + size > self.budget_bytes and self._entries:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= _size(old)
        self._entries[full_key] = (owner, delta)
        self._bytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
