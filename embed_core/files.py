"""Writing a file atomically: the one helper every writer of the project uses (checkpoint state, training data,
sweep records), so a crash never leaves half a file and a reader never sees one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

#: written files are world-readable (a shared results folder is read by other users' reports); mkstemp makes 0600
FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike, write: Callable[[IO[str]], None], encoding: str | None = None) -> Path:
    """Call ``write(fh)`` on a temporary file beside `path`, then rename it to `path`; on any error the
    temporary file is removed and `path` is left as it was. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """`obj` as indented, key-sorted JSON, written atomically (`default`: as in json.dump)."""
    return atomic_write(path, lambda fh: json.dump(obj, fh, indent=1, sort_keys=True, default=default))
