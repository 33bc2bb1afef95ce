"""Files that are either whole or absent: atomic writes of files and folders, the cache root.

A write goes to a temporary sibling that is renamed into place only once complete, so a killed
run never leaves a file or folder that reads as valid. Pure standard library: importing it pulls
in neither torch nor numpy.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "ROUTERRETRIEVER_CACHE"


def default_cache_dir() -> Path:
    """``$ROUTERRETRIEVER_CACHE``, else ``~/.cache/routerretriever``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "routerretriever"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


def recover_dir(target: Path) -> None:
    """Put back a folder that a replacement killed between its two renames left aside (only
    where the system cannot swap folders in one step)."""
    if target.exists():
        return
    left = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if left:
        os.replace(left[-1], target)


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a folder atomically: ``write(tmp)`` fills a temporary sibling, which is renamed onto
    ``target``; an existing ``target`` is replaced only once the new folder is complete, in one
    step where the system can swap two folders (Linux), else in two renames that
    :func:`recover_dir` undoes if killed between them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(tmp)
        mask = _umask()
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes folders private; use the usual modes
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # it now holds the old folder
            return target
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
