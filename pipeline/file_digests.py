"""sha256 of large local files, remembered across processes by (path, size, mtime, inode).

A local base model folder is part of the train fingerprint, and every plan (every `tunepipe run`,
cached or not) takes that fingerprint: hashing gigabytes of weights each time would cost seconds
to minutes. A digest is reused only while the file's size, modification time and inode are what
they were when it was hashed, and it is remembered only for a file already older than
`RACY_SECONDS` then: like git's "racily clean" rule, a rewrite within the same coarse mtime tick
could otherwise keep the stamp and change the bytes.

    digest = remembered_sha256(Path("models/llama/model-00001-of-00004.safetensors"))
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from pipeline.artifacts import sha256_file

CACHE_ENV = "TUNEPIPE_DIGEST_CACHE"
RACY_SECONDS = 2.0


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tunepipe" / "digests")


def remembered_sha256(path: Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    key = hashlib.sha256(str(path).encode()).hexdigest()
    record = cache_root() / key[:2] / f"{key}.json"
    try:
        known = json.loads(record.read_text())
        if known["path"] == str(path) and known["stamp"] == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, or unreadable: hash again (a damaged record is only a missed shortcut)
    digest = sha256_file(path)
    if time.time() - stat.st_mtime > RACY_SECONDS:
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.{uuid.uuid4().hex}")
        partial.write_text(json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}))
        os.replace(partial, record)  # a reader sees the old record or the new one, never half
    return digest


def folder_digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones aside), by path relative to it."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): remembered_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }
