"""Where embed_core finds shared data and keeps its caches. Both are configurable by env vars."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: `path`, else $EMBED_DATA_DIR, else ../shared/data beside the repo."""
    p = Path(path or os.environ.get("EMBED_DATA_DIR") or (REPO_ROOT.parent / "shared" / "data"))
    if not p.is_dir():
        raise DataError(
            f"data directory {str(p)!r} does not exist: pass data_dir=... or set EMBED_DATA_DIR "
            "to the folder that holds stsbenchmark/, sickr/, scifact/, ... (default ../shared/data)"
        )
    return p.resolve()


def cache_dir() -> Path:
    """Cache for converted models and similar artefacts: $EMBED_CACHE_DIR or ~/.cache/embed_core."""
    p = Path(os.environ.get("EMBED_CACHE_DIR") or (Path.home() / ".cache" / "embed_core"))
    p.mkdir(parents=True, exist_ok=True)
    return p
