"""Writing outputs so that they appear whole or not at all, and cleaning up after runs that died.

Every file or folder the package writes (merged models, network files, PNGs) is written first
under a *staging name* in the folder it goes to, then renamed into place:

    .<name>.scheduled-lora-tmp-<pid>-<random>    the unfinished output
    .<name>.scheduled-lora-old-<pid>-<random>    an old output folder moved aside while --force
                                                  replaces it (deleted once the new one is in place)

An error, Ctrl-C or SIGTERM removes the staging entry before the command exits. A process that is
killed outright (SIGKILL, the OOM killer, a power cut) cannot, so the next write into the same
folder (and ``merge`` before it starts) removes the staging entries whose process no longer runs
(:func:`remove_stale`); an old output that was moved aside and never replaced is put back instead.
Entries of live processes (another merge writing to the same folder) are left alone. The check is
by process id on this machine: on a folder shared between machines, or after the id was reused by
another process, a stale entry waits for a later run.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lib_scheduled_lora.errors import ScheduledLoraError, elide, path_text

TAG = "scheduled-lora"
_STAGING = re.compile(rf"^\.(?P<name>.+)\.{TAG}-(?P<kind>tmp|old)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+$", re.DOTALL)
# Bytes a staging name adds to the output's name: "." + ".scheduled-lora-tmp-" + pid (at most 10
# digits) + "-" + tempfile's 8 random characters.
STAGING_ROOM = 1 + len(f".{TAG}-tmp-") + 10 + 1 + 8

ErrorClass = type[ScheduledLoraError]


def staging_prefix(name: str, kind: str = "tmp") -> str:
    """The start of a staging name for output ``name`` (tempfile adds the random part)."""
    return f".{name}.{TAG}-{kind}-{os.getpid()}-"


def staging_owner(name: str) -> tuple[str, str, int] | None:
    """(output name, "tmp" | "old", pid) for a staging name, None for any other name."""
    match = _STAGING.match(name)
    return (match["name"], match["kind"], int(match["pid"])) if match else None


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return True  # cannot tell (no signals on this platform): keep the entry
    return True


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging entries in ``folder`` left by processes that no longer run; put back old
    outputs whose replacement never arrived. Best effort (an entry that cannot be removed stays).
    Returns the entries removed or put back."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    done = []
    for name in names:
        owner = staging_owner(name)
        if owner is None or process_alive(owner[2]):
            continue
        output, kind, _ = owner
        entry = folder / name
        try:
            target = folder / output
            if kind == "old" and not target.exists() and not target.is_symlink():
                os.rename(entry, target)
            else:
                _remove(entry)
        except OSError:
            continue
        done.append(entry)
    return done


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def default_mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for folders) less the process's umask: the mode a plain
    ``open``/``mkdir`` would give (tempfile makes its files and folders private)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value and value > 0 else default


def reason(exc: BaseException) -> str:
    """An OSError (or a library error wrapping one) as the few words a person needs."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    match = re.search(r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied", text)
    if match:
        return match.group(0)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return elide(first, 80)


def check_output(
    path: str | os.PathLike[str],
    error: ErrorClass,
    *,
    create_parents: bool = False,
    folder_output: bool = False,
) -> None:
    """Raise ``error(path, problem)`` when ``path`` cannot be written, before any work is done.

    Checks: a non-empty name that fits the file system (with room for the staging name), an
    existing output that is a folder where a file goes, the nearest existing folder above it (a
    file there is an error; missing folders are an error unless ``create_parents``) and that this
    process may create files in it.
    """
    text = os.fspath(path)
    if not text or not Path(text).name or "\x00" in text:
        raise error(repr(elide(text)), "is not a usable file name")
    path = Path(text)
    absolute = path.absolute()
    anchor = absolute.parent
    missing: list[Path] = []
    while True:
        try:
            exists = anchor.exists() or anchor.is_symlink()
        except OSError:  # a name too long for the file system: found below with the exact limit
            exists = False
        if exists or anchor == anchor.parent:
            break
        missing.append(anchor)
        anchor = anchor.parent
    name_max = _pathconf(anchor, "PC_NAME_MAX", 255)
    path_max = _pathconf(anchor, "PC_PATH_MAX", 4096)
    for part in absolute.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise error(path, f"the name {elide(part, 40)!r} is {size} bytes long; this file system allows {name_max}")
    size = len(os.fsencode(absolute.name))
    if size > name_max - STAGING_ROOM:
        raise error(
            path,
            f"file name too long ({size} bytes; at most {name_max - STAGING_ROOM} here, "
            f"the unfinished copy's name needs {STAGING_ROOM} more)",
        )
    if len(os.fsencode(str(absolute))) + STAGING_ROOM >= path_max:
        raise error(path, f"path too long ({len(os.fsencode(str(absolute)))} bytes; this system allows {path_max})")
    if not anchor.is_dir():
        raise error(path, f"{path_text(anchor)} is not a folder")
    if missing and not create_parents:
        raise error(path, f"folder {elide(str(path.parent))!r} does not exist")
    if path.is_dir() and not folder_output:
        raise error(path, "is a folder; give a file name")
    if not os.access(anchor, os.W_OK | os.X_OK):
        problem = "read-only file system" if _read_only(anchor) else "permission denied"
        raise error(path, f"cannot write in folder {elide(str(anchor))!r} ({problem})")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; the ones created, deepest first."""
    created = []
    current = folder
    while not current.exists() and current != current.parent:
        created.append(current)
        current = current.parent
    for missing in reversed(created):
        missing.mkdir()
    return created


def _remove_folders(created: list[Path]) -> None:
    for folder in created:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            folder.rmdir()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX only; Windows cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


EXISTS = "already exists; refusing to overwrite it (use --force to replace it)"


@contextlib.contextmanager
def staged_file(
    path: str | os.PathLike[str], error: ErrorClass, *, replace: bool = True, create_parents: bool = False
) -> Iterator[Path]:
    """Yield a staging path in ``path``'s folder to write the file to; on a normal exit it becomes
    ``path`` (durably), on any exception (including KeyboardInterrupt) it is removed, with the
    folders this call created. OSErrors become ``error(path, "cannot write: ...")``. Without
    ``replace`` an existing ``path`` is never overwritten, even one that appears meanwhile."""
    path = Path(path)
    folder = path.parent
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = _make_folders(folder) if create_parents else []
        remove_stale(folder)
        fd, name = tempfile.mkstemp(prefix=staging_prefix(path.name), dir=folder)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, default_mode(0o666))  # mkstemp makes it 0600
        _fsync(tmp)
        _publish(tmp, path, replace, error)
        fsync_folder(folder)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _remove_folders(created)
        if isinstance(exc, OSError):
            raise error(path, f"cannot write: {reason(exc)}") from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # after a hard link it is a second name of the output


def _publish(tmp: Path, path: Path, replace: bool, error: ErrorClass) -> None:
    if replace:
        os.replace(tmp, path)
        return
    # link() fails if the target appeared meanwhile, so a racing writer is never clobbered.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise error(path, EXISTS) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links
            raise error(path, EXISTS) from None
        os.replace(tmp, path)


@contextlib.contextmanager
def staged_folder(output: str | os.PathLike[str], error: ErrorClass, *, replace: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``output`` to fill; on a normal exit it becomes ``output``
    (an existing one is replaced only with ``replace``, and kept until the new one is in place),
    on any exception it is removed."""
    output = Path(output)
    folder = output.parent
    remove_stale(folder)
    try:
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output.name), dir=folder))
        os.chmod(staging, default_mode(0o777))  # mkdtemp makes it 0700
    except OSError as exc:
        raise error(output, f"cannot write: {reason(exc)}") from None
    try:
        yield staging
        _swap_into_place(staging, output, replace, error)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise error(output, f"cannot write: {reason(exc)}") from None
        raise


def _swap_into_place(staging: Path, output: Path, replace: bool, error: ErrorClass) -> None:
    if not output.exists() and not output.is_symlink():
        os.rename(staging, output)
        fsync_folder(output.parent)
        return
    if not replace:
        raise error(output, EXISTS)
    # A folder cannot atomically replace another: move the old one aside, rename, then delete it.
    # A kill between the two renames leaves the old one under an "old" staging name, which the
    # next run puts back (remove_stale).
    aside = Path(tempfile.mkdtemp(prefix=staging_prefix(output.name, "old"), dir=output.parent))
    aside.rmdir()
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside, output)  # put the old one back
        raise
    fsync_folder(output.parent)
    with contextlib.suppress(OSError):
        _remove(aside)
