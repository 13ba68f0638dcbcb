"""Small helpers every layer may use: atomic file writes (the lowest layer; imports nothing of med3dvlm)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TEMPORARY_MARK = ".tmp"  # in the name of every file written under a temporary name


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place, so a killed
    run never leaves a half-written file under the final name. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_MARK}")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
