"""Integrity of the GGUF -> safetensors cache: a manifest written with each entry, checked at load.

Each converted entry carries `bitserve_manifest.json`: the size and SHA-256 of every file,
recorded before the entry is renamed into place. An entry whose files no longer match (truncated
by a full disk, edited, half-copied) fails `verify` with the path and the reason, and the
caller converts again. Temporary directories left by a conversion that was killed are swept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "bitserve_manifest.json"
# A temporary directory whose owner cannot be checked (another host or pid namespace) is
# treated as abandoned after this long; no conversion takes anywhere near it.
STALE_AFTER_S = 6 * 3600
_CHUNK = 8 * 1024 * 1024


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(entry: Path) -> None:
    """Record size and hash of every file in `entry` (before it is renamed into place)."""
    files = {
        str(p.relative_to(entry)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(entry.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (entry / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def verify(entry: Path) -> str | None:
    """None when `entry` matches its manifest, else what is wrong (naming the file)."""
    try:
        files = json.loads((entry / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{entry / MANIFEST}: missing or unreadable manifest ({type(e).__name__})"
    if "config.json" not in files:
        return f"{entry}: manifest lists no config.json"
    for name, want in files.items():
        p = entry / name
        if not p.is_file():
            return f"{p}: missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{p}: {size} bytes, {want['size']} recorded"
        if _sha256(p) != want["sha256"]:
            return f"{p}: SHA-256 differs from the one recorded"
    return None


def temp_prefix(entry_name: str) -> str:
    """Prefix of a conversion's temporary directory: names its owner so a sweep can check it."""
    return f".{entry_name}-pid{os.getpid()}-"


def _owner_alive(name: str) -> bool | None:
    """Whether the process named in a temporary directory's name runs; None when unknown."""
    marker = name.rfind("-pid")
    if marker < 0:
        return None
    digits = name[marker + 4 :].split("-", 1)[0]
    if not digits.isdigit():
        return None
    pid = int(digits)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path) -> list[Path]:
    """Remove temporary directories of conversions that were killed. Returns what it removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for p in root.iterdir():
        if not (p.name.startswith(".") and p.is_dir()):
            continue
        alive = _owner_alive(p.name)
        if alive is False or (alive is None and now - p.stat().st_mtime > STALE_AFTER_S):
            log.warning("removing %s, left by a conversion that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def discard(entry: Path) -> None:
    """Move a failed entry out of the way (atomically), then delete it."""
    aside = entry.with_name(f"{temp_prefix(entry.name)}discarded-{time.monotonic_ns()}")
    try:
        os.rename(entry, aside)
    except OSError:
        return  # another process moved or replaced it first
    shutil.rmtree(aside, ignore_errors=True)
