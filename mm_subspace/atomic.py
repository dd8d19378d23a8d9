"""Atomic files: write beside the target, fsync, rename into place; undo everything on failure.

:func:`atomic_paths` is what every writer of the package builds on (adapter folders, exported files,
checkpoints, plots, manifests); :func:`file_errors` turns a hostile input file's low-level errors
into an :class:`~mm_subspace.errors.AdapterFileError` naming the path. Nothing here knows the adapter
format: :mod:`mm_subspace.io` registers its repair of an interrupted save with :func:`register_repair`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import AdapterFileError, SubspaceError

logger = logging.getLogger(__name__)


def file_errors(func: Callable) -> Callable:
    """Decorator for loaders/importers: a non-:class:`SubspaceError` raised while reading a hostile or
    broken file (bad JSON nesting, huge ints, wrong field types, a folder where a file belongs, odd
    tensor ranks) becomes an :class:`AdapterFileError` naming the path. Bugs in the caller's model
    are not the file's fault, but a loader's contract is to raise only ``SubspaceError``."""
    import functools
    import inspect

    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SubspaceError:
            raise
        except (ValueError, TypeError, LookupError, AttributeError, RecursionError, OSError, UnicodeError,
                ArithmeticError, NotImplementedError) as err:
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            path = next((bound[k] for k in ("path", "src", "folder", "dir") if k in bound), None)
            where = f"{func.__name__}({str(path) if path is not None else ''})"
            if isinstance(err, OSError):  # permissions, a folder where a file belongs, a full disk
                raise AdapterFileError(f"{where}: {type(err).__name__}: {err}") from err
            raise AdapterFileError(
                f"{where}: the input cannot be read ({type(err).__name__}: {str(err)[:300]}); it is corrupt, "
                "hand-edited or not in the expected format"
            ) from err

    return wrapper


#: what a path that is not a regular file is, for messages
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path, mode: int) -> AdapterFileError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return AdapterFileError(f"{path} is {kind}, not a regular file, so it cannot be read (reading it could block or "
                            "never end); put the real file there or remove it")


def require_regular_file(path: str | os.PathLike, missing: str) -> None:
    """Raise :class:`AdapterFileError` with ``missing`` if ``path`` does not exist, or naming what it is if it is
    not a regular file (symlinks followed): a FIFO would block a reader forever, ``/dev/zero`` never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AdapterFileError(missing) from None
    if not stat.S_ISREG(mode):
        raise _not_regular(Path(path), mode)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file, else :class:`AdapterFileError` naming what it is.

    Opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO put in place after a
    check cannot block the caller. ``FileNotFoundError``/``PermissionError`` propagate.
    """
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(Path(path), mode)
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of a regular file (:func:`open_regular`); ``UnicodeDecodeError`` on invalid UTF-8."""
    with open_regular(path) as fh:
        return fh.read().decode("utf-8")


#: our temporary / backup names: ".<target>.tmp-<pid>-<8 hex>" and the same + ".old"
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<old>\.old)?$")


def _fs_step(label: str) -> None:
    """Called before every file operation of an atomic write (``label`` names it); a no-op.

    The kill-at-every-point test replaces it to stop the process between any two operations.
    """


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap liveness test: leftovers are then removed by age (see leftovers())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def leftovers(folder: Path, targets: list[str] | None = None, stale_only: bool = False) -> list[Path]:
    """Temporary/backup files of our own naming in ``folder`` (for ``targets`` names, default all).

    ``stale_only``: only those whose writing process is gone (POSIX), or older than an hour (elsewhere).
    """
    import time

    found = []
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            m = _LEFTOVER.match(path.name)
            if not m or (targets is not None and m["target"] not in targets) or not path.is_file():
                continue
            if stale_only:
                pid = int(m["pid"])
                if os.name == "posix" and _pid_alive(pid):
                    continue
                if os.name != "posix" and time.time() - path.stat().st_mtime < 3600:
                    continue
            found.append(path)
    return sorted(found)


def _tidy(folder: Path, targets: list[str]) -> None:
    """Before writing ``targets`` in ``folder``: run the repairs registered for them, then delete stale leftovers."""
    stale = leftovers(folder, targets, stale_only=True)
    if not stale:
        return
    for names, repair in _REPAIRS:
        if names & set(targets):
            repair(folder)
    for path in leftovers(folder, targets, stale_only=True):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    logger.info("removed %d leftover file(s) of interrupted saves in %s", len(stale), folder)


#: (file names, repair(folder)): run before a write of any of those names finds stale leftovers
_REPAIRS: list[tuple[frozenset[str], Callable[[Path], None]]] = []


def register_repair(names: tuple[str, ...], repair: Callable[[Path], None]) -> None:
    """Run ``repair(folder)`` before a write of any of ``names`` into ``folder`` that finds leftovers of a
    killed writer (e.g. the adapter format puts back weights only a backup still holds)."""
    _REPAIRS.append((frozenset(names), repair))


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux ``/proc``); else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` gives a new file. Every file we write gets it, whatever created
    the temporary (safetensors writes ``0o600``), so weights are as readable as their config."""
    return 0o666 & ~current_umask()


def fsync_dir(folder: Path) -> None:
    """fsync a directory, so a rename in it survives a power loss (a no-op where impossible)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_paths(*targets: Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``targets``; on success rename each onto its target, in order.

    Each file gets the mode ``0o666 & ~umask`` (:func:`default_file_mode`) before its rename, as a plain
    ``open()`` would give it, whichever library wrote the temporary.

    On any exception the temporaries are deleted and the targets are untouched — also when a rename
    fails after an earlier target was already replaced: that one is put back from a hard link of its
    old content (so weights and config never end up from two different saves). The old content
    stays under a backup name until the last rename is done, so a process killed between two
    renames leaves the previous set recoverable (:func:`load_adapter` does it for adapters);
    leftovers of killed writers are deleted by the next write into the same folder.
    """
    for folder in dict.fromkeys(t.parent for t in targets):
        _tidy(folder, [t.name for t in targets if t.parent == folder])
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temps = [t.with_name(f".{t.name}.tmp-{tag}") for t in targets]
    olds = [tmp.with_name(tmp.name + ".old") for tmp in temps]
    done: list[tuple[Path, Path | None]] = []
    try:
        _fs_step("write")
        yield temps
        mode = default_file_mode()
        for tmp in temps:
            if os.name == "posix":
                os.chmod(tmp, mode)
            _fs_step(f"fsync {tmp.name}")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, target, old in zip(temps, targets, olds):
            _fs_step(f"backup {target.name}")
            kept = _keep_old(target, old)
            _fs_step(f"replace {target.name}")
            os.replace(tmp, target)
            done.append((target, kept))
        for folder in dict.fromkeys(t.parent for t in targets):
            _fs_step("fsync dir")
            fsync_dir(folder)
    except BaseException:
        for target, kept in reversed(done):  # roll back the renames already made
            if kept is None:
                target.unlink()
            else:
                os.replace(kept, target)
        raise
    finally:
        for tmp in temps + olds:
            if tmp.exists():
                _fs_step(f"unlink {tmp.name.split('.tmp-')[0]}{'.old' if tmp.name.endswith('.old') else ''}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success fsync its files and rename it to ``target``.

    A process killed while filling it leaves no ``target`` (only a ``.<name>.tmp-<pid>-<id>`` folder, deleted by
    the next call once that process is gone), so a half-written folder is never taken for a whole one. On an
    exception the temporary folder is deleted. ``target`` must not exist yet.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for path in parent.glob(f".{target.name}.tmp-*"):
        m = _LEFTOVER.match(path.name)
        if m and m["target"] == target.name and path.is_dir() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _keep_old(target: Path, old: Path) -> Path | None:
    """Make ``old`` a second name (hard link, else a copy) of ``target``'s current content; None if absent."""
    if not target.exists():
        return None
    try:
        os.link(target, old)
    except OSError:
        shutil.copyfile(target, old)
    return old


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_paths(Path(path)) as (tmp,):
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_dir", "atomic_paths", "atomic_write_text", "current_umask", "default_file_mode", "file_errors", "fsync_dir", "leftovers",
           "open_regular", "read_text_file", "register_repair", "require_regular_file", "sha256_file"]
