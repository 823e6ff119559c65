"""Files holding credentials (S3 identities, cluster state, tokens): owner-only from the start.

Writing a file and chmod-ing it afterwards leaves a window in which the file exists with
the umask's mode (often world-readable) and already holds the secret. Here the file is
created with mode 0600 before anything is written, under a temporary name nobody else can
have made (O_EXCL, no symlinks followed), and renamed over the target when complete, so
the target is never readable by others, nor ever half-written.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

MODE = 0o600


def write_owner_only(path: str | Path, data: str | bytes) -> Path:
    """Write data (text is UTF-8 encoded) to path, readable and writable by its owner only."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), MODE)
    try:
        try:
            # the umask can only take bits away: make the mode exactly 0600 (still empty here)
            os.fchmod(fd, MODE)
            view = memoryview(payload)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
