"""Reading and writing ``.safetensors`` files, with one-line errors that name the file.

Only safetensors is ever read: pickle-based files (``.ckpt``, ``.pt``, ``.bin``...) can run arbitrary
code while they are loaded, so they are refused before a byte of them is unpickled.

The header is checked by hand before the safetensors library sees the file, so that a truncated or
corrupt file gives a message a person can act on ("truncated: 1234 bytes of tensor data missing")
instead of a library error code.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from lib_scheduled_lora.errors import NetworkFileError, ScheduledLoraError

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})

# Bits per element of every dtype the safetensors format defines.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# Same limit as the safetensors library: a header larger than this is not a real header.
_MAX_HEADER_BYTES = 100_000_000


def _pickle_problem(path: Path, head: bytes, size: int) -> str | None:
    suffix = path.suffix.lower()
    # A safetensors file starts with its header length (little-endian u64) and then '{'. Its first
    # bytes can look like a pickle opcode (a 640-byte header starts b"\x80\x02"), so content is only
    # called a pickle when it is not a plausible safetensors file.
    plausible = len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8
    looks_pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    looks_torch_zip = head[:4] == b"PK\x03\x04"
    if suffix in PICKLE_SUFFIXES or (not plausible and (looks_pickled or looks_torch_zip)):
        kind = f"a {suffix} file" if suffix in PICKLE_SUFFIXES else "a pickle (torch.save) file"
        return (
            f"is {kind}; pickle-based files can run arbitrary code when loaded, so only .safetensors "
            "files are read (convert it to .safetensors first)"
        )
    return None


def _check_header(path: Path, size: int, head: bytes, read_header) -> tuple[dict, int]:
    """Return (header dict, data offset); raise NetworkFileError on anything malformed."""
    if size < 8:
        raise NetworkFileError(path, f"not a safetensors file: only {size} bytes long")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len == 0 or header_len > _MAX_HEADER_BYTES:
        raise NetworkFileError(path, f"not a safetensors file (header length field reads {header_len})")
    if header_len > size - 8:
        raise NetworkFileError(
            path,
            f"truncated or not a safetensors file: the header should be {header_len} bytes "
            f"but only {size - 8} bytes follow the length field",
        )
    raw = read_header(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NetworkFileError(path, f"corrupt safetensors header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise NetworkFileError(path, "corrupt safetensors header: not a JSON object")
    return header, 8 + header_len


def _check_entries(path: Path, header: dict, data_size: int) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise NetworkFileError(path, "corrupt safetensors header: __metadata__ is not a map of strings")
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            bits = _DTYPE_BITS[dtype]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise NetworkFileError(path, f"corrupt safetensors header: bad entry for tensor {name!r}")
        if (end - begin) * 8 != math.prod(shape) * bits:
            raise NetworkFileError(
                path, f"corrupt safetensors header: tensor {name!r} has {end - begin} bytes for shape {shape}"
            )
        needed = max(needed, end)
    if needed > data_size:
        raise NetworkFileError(
            path,
            f"truncated: the tensors need {needed} bytes of data but the file holds {data_size} "
            f"({needed - data_size} bytes missing)",
        )
    if needed < data_size:
        raise NetworkFileError(path, f"corrupt safetensors file: {data_size - needed} unexpected bytes after the tensor data")
    return dict(metadata)


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO"...), None for a regular file."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _checked_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """(header, metadata, file size) of a .safetensors file, every entry checked against the size."""
    try:
        info = path.stat()
        kind = _file_kind(info.st_mode)
        if kind is not None:
            # Never opened: reading a FIFO or a device would block or never end.
            suffix = ", not a .safetensors file" if kind == "a directory" else "; a network or model must be a regular .safetensors file"
            raise NetworkFileError(path, f"is {kind}{suffix}")
        size = info.st_size
        with open(path, "rb") as handle:
            head = handle.read(16)
            if size == 0:
                raise NetworkFileError(path, "empty file (0 bytes)")
            problem = _pickle_problem(path, head, size)
            if problem:
                raise NetworkFileError(path, problem)

            def read_header(n: int) -> bytes:
                handle.seek(8)
                return handle.read(n)

            header, data_start = _check_header(path, size, head, read_header)
    except FileNotFoundError:
        raise NetworkFileError(path, "file not found") from None
    except PermissionError:
        raise NetworkFileError(path, "permission denied") from None
    except IsADirectoryError:
        raise NetworkFileError(path, "is a directory, not a .safetensors file") from None
    except OSError as exc:  # a name too long, an I/O error, a loop of links...
        raise NetworkFileError(path, f"cannot read: {exc.strerror or exc}") from None
    metadata = _check_entries(path, header, size - data_start)
    return header, metadata, size


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The checked header of a .safetensors file (``{name: {"dtype", "shape", ...}}`` and
    ``__metadata__``) without reading its tensors; the same errors as :func:`read_safetensors`."""
    header, _, _ = _checked_header(Path(path))
    return header


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor (on CPU, in the file's dtype) and the string metadata of a .safetensors file.

    Raises NetworkFileError (one line, naming the file) for a missing or empty file, a pickle file,
    a file that is not safetensors, a FIFO or device (never opened), and a truncated or corrupt
    header or data.
    """
    path = Path(path)
    _, metadata, _ = _checked_header(path)

    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any library failure is a corrupt file to the user
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NetworkFileError(path, f"corrupt safetensors file: {message}") from None
    return tensors, metadata


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing storage (safetensors refuses shared or strided ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{key!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def write_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    error: type[ScheduledLoraError] = NetworkFileError,
) -> None:
    """Write ``tensors`` to ``path`` so that the file is either complete or absent.

    The data goes to a staging file in the same folder (:mod:`lib_scheduled_lora.core.staging`),
    is flushed and fsync'ed, then renamed over ``path`` (atomic on POSIX and Windows). An existing
    ``path`` is refused unless ``force``. Failures (a full disk included) raise ``error``
    (NetworkFileError by default; merge passes ModelFormatError), and the staging file is removed
    on any failure, including KeyboardInterrupt and SIGTERM.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from lib_scheduled_lora.core.staging import EXISTS, reason, staged_file

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(path, "metadata must map strings to strings")
    if path.exists() and not force:
        raise error(path, EXISTS)
    folder = path.parent
    if not folder.is_dir():
        raise error(path, f"folder {str(folder)!r} does not exist")
    try:
        prepared = _unshared(tensors)
    except TypeError as exc:
        raise error(path, f"cannot write: {exc}") from None
    with staged_file(path, error, replace=force) as tmp:
        try:
            save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)
        except SafetensorError as exc:  # the library wraps I/O errors (a full disk) in its own type
            raise error(path, f"cannot write: {reason(exc)}") from None
