"""Large ``.safetensors`` files one tensor at a time: a reader and a streaming, atomic writer.

A checkpoint is several GB; loading it whole and writing a changed copy holds two models in
memory. Here a tensor is read with a plain positioned read (no memory map, whose touched pages
would count as resident for the rest of the run) and written as soon as it is final, so a bake
holds one layer at a time.

The writer knows every name, dtype and shape before the first byte (they come from the source's
header), writes the header, then the data in that order, to a temporary file in the output's
folder that is renamed into place only when complete: the output appears whole or not at all,
an existing one is replaced only with ``force``, the free space is checked first, and the
temporary file is removed on any failure (disk full, cancel, KeyboardInterrupt). A killed
process leaves at most that hidden ``.NAME.*.tmp`` file, never a partial output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from lib_scheduled_lora.core.networks.files import (
    _check_entries,
    _check_header,
    _pickle_problem,
)
from lib_scheduled_lora.core.staging import EXISTS, staged_file
from lib_scheduled_lora.errors import ModelFormatError, NetworkFileError, ScheduledLoraError

# safetensors dtype names <-> torch dtypes (the ones a checkpoint holds)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
SPACE_MARGIN = 16 * 2**20  # bytes kept free beyond the file itself (the file system needs some)


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsReader:
    """The header of a ``.safetensors`` file (checked as ``read_safetensors`` checks it) and its
    tensors one at a time. Problems raise ``error`` (ModelFormatError by default) naming the file."""

    def __init__(self, path: str | os.PathLike, error: type[ScheduledLoraError] = ModelFormatError):
        self.path = Path(path)
        self._error = error
        try:
            size = self.path.stat().st_size
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        except FileNotFoundError:
            raise error(self.path, "file not found") from None
        except IsADirectoryError:
            raise error(self.path, "is a directory, not a .safetensors file") from None
        except PermissionError:
            raise error(self.path, "permission denied") from None
        try:
            self.entries, self.metadata = self._read_header(size)
        except BaseException:
            self._file.close()
            raise

    def _read_header(self, size: int) -> tuple[dict[str, Entry], dict[str, str]]:
        handle = self._file
        head = handle.read(16)
        try:
            if size == 0:
                raise NetworkFileError(self.path, "empty file (0 bytes)")
            problem = _pickle_problem(self.path, head, size)
            if problem:
                raise NetworkFileError(self.path, problem)

            def read_header(n: int) -> bytes:
                handle.seek(8)
                return handle.read(n)

            header, data_start = _check_header(self.path, size, head, read_header)
            metadata = _check_entries(self.path, header, size - data_start)
        except NetworkFileError as exc:
            raise self._error(self.path, exc.problem) from None
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise self._error(self.path, f"tensor {name!r} has dtype {entry['dtype']}, which is not supported")
            begin, end = entry["data_offsets"]
            entries[name] = Entry(name, dtype, tuple(entry["shape"]), data_start + begin, data_start + end)
        ordered = dict(sorted(entries.items(), key=lambda item: item[1].begin))
        return ordered, metadata

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self.entries.items()}

    def read(self, name: str) -> torch.Tensor:
        """One tensor, on CPU, in the file's dtype (a fresh tensor, not a view of the file)."""
        entry = self.entries[name]
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            self._file.seek(entry.begin)
            got = self._file.readinto(buffer.numpy().data)
            if got != entry.nbytes:
                raise self._error(self.path, f"truncated while reading tensor {name!r}")
        return buffer.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class Planned:
    """One tensor of a file to be written: its name, dtype and shape, known before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def _header(planned: Sequence[Planned], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for item in planned:
        header[item.name] = {
            "dtype": NAMES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw


def check_free_space(folder: Path, needed: int, path: Path, error: type[ScheduledLoraError]) -> None:
    """Refuse to start a write that cannot finish (``needed`` bytes plus a margin)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no figure to check against; a real shortage still fails cleanly while writing
    if free < needed + SPACE_MARGIN:
        raise error(
            path, f"not enough free space: the output needs {_gb(needed)}, {folder} has {_gb(free)} free"
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**28 else f"{n / 2**20:.1f} MB"


class StreamingWriter:
    """Writes ``planned`` tensors to ``path`` in that order (use as a context manager).

    The file is staged (:func:`lib_scheduled_lora.core.staging.staged_file`: a recognisable hidden
    name beside ``path``): leaving the context normally renames the finished file into place;
    leaving it with an exception (or before every tensor was written) removes it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        planned: Sequence[Planned],
        metadata: Mapping[str, str] | None = None,
        *,
        force: bool = False,
        error: type[ScheduledLoraError] = ModelFormatError,
    ):
        self.path = Path(path)
        self.planned = list(planned)
        self.metadata = dict(metadata) if metadata else None
        self.force = force
        self.error = error
        self._next = 0
        self._stage: contextlib.AbstractContextManager[Path] | None = None
        self._file: BinaryIO | None = None

    def __enter__(self) -> StreamingWriter:
        path, error = self.path, self.error
        if self.metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()
        ):
            raise error(path, "metadata must map strings to strings")
        if path.exists() and not self.force:
            raise error(path, EXISTS)
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise error(path, f"folder {str(folder)!r} does not exist")
        header = _header(self.planned, self.metadata)
        check_free_space(folder, len(header) + sum(p.nbytes for p in self.planned), path, error)
        self._stage = staged_file(path, error, replace=self.force)
        tmp = self._stage.__enter__()
        try:
            self._file = open(tmp, "wb")  # noqa: SIM115 - closed in __exit__
            self._file.write(header)
        except BaseException as exc:
            self._close()
            self._stage.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, which must be the next planned one (name, dtype and shape)."""
        assert self._file is not None, "write() outside the context"
        expected = self.planned[self._next]
        if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise AssertionError(
                f"expected {expected.name} {expected.dtype} {list(expected.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            self._file.write(data.numpy().data)
        except OSError as exc:
            raise self.error(self.path, f"cannot write: {exc.strerror or exc}") from None
        self._next += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._stage is not None
        incomplete = exc_type is None and self._next != len(self.planned)
        self._close()
        if incomplete:
            failure = AssertionError(f"only {self._next} of {len(self.planned)} tensors were written")
            self._stage.__exit__(AssertionError, failure, None)
            raise failure
        self._stage.__exit__(exc_type, exc, tb)  # publishes on success, removes on failure

    def _close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
