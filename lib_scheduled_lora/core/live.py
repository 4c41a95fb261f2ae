"""One weight (or bias, or row slice of a fused weight) that the engine writes, and its original.

Where the original is kept and where merged values go is a :class:`Placement`:

* ``SWAP`` (weights in host memory, the CPU): the original tensor itself is the backup; while a
  network acts, ``param.data`` points at a buffer of ours holding ``round(W + Σ m·ΔW)``; going
  back to the base model points it at the original again (no copy, bit-identical by construction).
* ``IN_PLACE`` (weights on an accelerator, and row slices): merged values are written into the
  live weight; the original is copied once, to host RAM by default (on the device only within the
  user's device-memory budget), and copied back to restore. No second copy on the device.

Hosts move parameters during a generation (A1111 ``--medvram``/``--lowvram``, diffusers and
accelerate offloading, Forge's memory manager): ``module.to(...)`` gives ``param.data`` a new
tensor. A :class:`LiveTensor` notices (the tensor it left is not the one there now) and treats the
original converted to the parameter's current device and dtype as the base from then on, so a
write after a move is ``round(W_base + Σ m·ΔW)`` where the weight is now, and a restore puts the
original back where the host expects it now. A parameter on the ``meta`` device (accelerate's
sequential offload keeps the values elsewhere and streams them per forward) cannot be written:
:attr:`LiveTensor.writable` is False and the engine applies the networks at forward time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from lib_scheduled_lora.core.combine import Term, combine


class Placement(Enum):
    SWAP = "swap"
    IN_PLACE = "in_place"


# Device types whose memory is host RAM (where backups and merge buffers cost no accelerator memory).
HOST_MEMORY = frozenset({"cpu"})


def is_host_memory(device: torch.device) -> bool:
    return device.type in HOST_MEMORY


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class BufferPool:
    """Merge buffers handed back by finished engines, reused by the next ones (no fresh
    allocation, and no page faults, per generation). Keyed by shape, dtype and device.
    """

    max_bytes: int = 2**40
    _free: dict[tuple, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    _bytes: int = 0
    _model_key: object = None

    def bind(self, model_key: object) -> None:
        """Say which model the next buffers are for; buffers of another model are dropped."""
        if model_key != self._model_key:
            self.clear()
            self._model_key = model_key

    def take(self, like: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """An uninitialised buffer shaped like ``like`` on ``device`` (default: like's); host
        buffers for CUDA tensors are pinned (fast, exact copies back)."""
        device = torch.device(device) if device is not None else like.device
        pinned = device.type == "cpu" and like.device.type == "cuda"  # pinned: only for CUDA's own copies
        free = self._free.get((tuple(like.shape), like.dtype, device, pinned))
        if free:
            buffer = free.pop()
            self._bytes -= nbytes(buffer)
            return buffer
        return torch.empty(tuple(like.shape), dtype=like.dtype, device=device, pin_memory=pinned)

    def give(self, buffer: torch.Tensor) -> None:
        if self._bytes + nbytes(buffer) <= self.max_bytes:
            self._free[_pool_key(buffer)].append(buffer)
            self._bytes += nbytes(buffer)

    @property
    def bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._free.clear()
        self._bytes = 0


def _pool_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device, t.is_pinned())


def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape))


class LiveTensor:
    """A parameter (or a row slice of one) whose values the engine sets to ``round(W + Σ m·ΔW)``."""

    def __init__(self, param: nn.Parameter, rows: tuple[int, int] | None, pool: BufferPool | None = None):
        self.param = param
        self.rows = rows
        self.pool = pool
        data = param.data
        # Whole weights in host memory swap buffers; accelerator weights and row slices (which
        # cannot be swapped alone) are written in place.
        self.placement = Placement.SWAP if rows is None and is_host_memory(data.device) else Placement.IN_PLACE
        self.backup: torch.Tensor | None = None  # the original values, taken at the first write
        self.own_backup = False  # the backup is a copy of ours (not the model's original tensor)
        self.spare: torch.Tensor | None = None  # SWAP: the buffer holding merged values
        self.on_spare = False
        self._left: tuple | None = None  # identity of the tensor we last left in param.data

    # -- what is there now ------------------------------------------------------------------------

    @property
    def data(self) -> torch.Tensor:
        data = self.param.data
        return data if self.rows is None else data[self.rows[0] : self.rows[1]]

    @property
    def writable(self) -> bool:
        return not self.param.data.is_meta

    @property
    def moved(self) -> bool:
        """The host replaced ``param.data`` since we last touched it (``.to()``, offloading)."""
        return self._left is not None and _identity(self.param.data) != self._left

    def base(self) -> torch.Tensor:
        """The original values where the weight is now: the backup, converted when the host moved
        the parameter to another dtype (on its device: :func:`combine` moves it)."""
        if self.backup is None:
            return self.data
        dtype = self.param.data.dtype
        return self.backup if self.backup.dtype == dtype else self.backup.to(dtype)

    # -- writing and restoring ----------------------------------------------------------------------

    def take_backup(self, on_device: bool = False) -> None:
        """Keep the original values (once): the tensor itself (SWAP), or a copy in host RAM
        (``on_device``: on the weight's own device, within the user's budget)."""
        if self.backup is not None:
            return
        data = self.data
        if self.placement is Placement.SWAP:
            self.backup = data
            return
        device = data.device if on_device else torch.device("cpu")
        self.backup = (self.pool or BufferPool()).take(data, device)
        self.backup.copy_(data)
        self.own_backup = True

    def write(self, terms: Sequence[Term]) -> None:
        """Set the values to ``round(base + Σ m·ΔW)`` (``terms`` non-empty)."""
        self.take_backup()
        if self.moved:
            self._host_moved_it()
        if self.placement is Placement.SWAP:
            if self.spare is None:
                self.spare = (self.pool or BufferPool()).take(self.param.data)
            combine(self.base(), terms, out=self.spare)
            self.param.data = self.spare
            self.on_spare = True
        else:
            combine(self.base(), terms, out=self.data)
        self._left = _identity(self.param.data)

    def to_base(self) -> None:
        """The original values, exactly, where the host expects the weight now."""
        if self.backup is None:
            return
        if self.moved:
            self._host_moved_it()
        data = self.param.data
        if self.placement is Placement.SWAP or (self.rows is None and self._is_backup_home(data)):
            self.param.data = self.backup  # the original tensor itself (no copy)
            self.on_spare = False
        elif not data.is_meta:  # on meta the host keeps the values elsewhere; nothing of ours there
            self.data.copy_(self.base())
        self._left = _identity(self.param.data)

    def release(self) -> None:
        """Restore, and give the buffers back."""
        self.to_base()
        if self.pool is not None:
            if self.spare is not None:
                self.pool.give(self.spare)
            if self.backup is not None and self.own_backup:
                self.pool.give(self.backup)
        self.backup = self.spare = None
        self.own_backup = False
        self._left = None

    def _is_backup_home(self, data: torch.Tensor) -> bool:
        """The backup is the original tensor and the parameter is back on its device and dtype."""
        backup = self.backup
        return (
            backup is not None
            and self.placement is Placement.SWAP
            and backup.device == data.device
            and backup.dtype == data.dtype
        )

    def _host_moved_it(self) -> None:
        """After a host move our buffer is no longer the live tensor: write in place from now on
        (the host owns the new tensor), keep the backup (the truth), hand the buffer back."""
        if self.placement is Placement.SWAP:
            data = self.param.data
            if self.backup is not None and self.backup.device == data.device and self.backup.dtype == data.dtype:
                return  # moved back home, e.g. offloaded to the CPU again: swapping still works
            self.placement = Placement.IN_PLACE
            self.on_spare = False
            if self.spare is not None and self.pool is not None:
                self.pool.give(self.spare)
            self.spare = None

    # -- accounting -------------------------------------------------------------------------------

    def extra_bytes(self) -> dict[tuple[str, str], int]:
        """Bytes this tensor's bookkeeping holds, by (role, device): the backup (not counted when
        it is the original tensor itself) and the merge buffer."""
        out: dict[tuple[str, str], int] = defaultdict(int)
        if self.backup is not None and self.own_backup:
            out[("backup", str(self.backup.device))] += nbytes(self.backup)
        if self.spare is not None:
            out[("merge buffer", str(self.spare.device))] += nbytes(self.spare)
        return out
