"""Errors and files shared by all stages: `InputError` (one line naming the file and the problem,
exit 2), atomic writes (a temporary file beside the target, then rename) and `require_file`."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class InputError(Exception):
    """A problem with a user-supplied file or value; the message names the file and the problem."""


def temp_beside(path: Path) -> Path:
    """A new hidden temporary file `.{name}.*{suffix}` beside `path`.

    Temporary files of `path` left by a killed writer are removed first (they can be large).
    """
    pattern = f"{glob.escape(f'.{path.name}.')}*{glob.escape(path.suffix)}"
    for stale in path.parent.glob(pattern):
        log.info("removing %s, left by an interrupted write of %s", stale, path.name)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise InputError if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} does not exist")
    return path
