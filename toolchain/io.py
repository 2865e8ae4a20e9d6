"""Atomic file writes: a temporary file beside the target, renamed into place on success."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import ToolchainError


def _temp_beside(target: Path) -> Path:
    """A new empty temporary file in target's folder (created if missing), or a clear error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ToolchainError(f"cannot write {target}: a parent of it is a file, not a folder") from exc
    except PermissionError as exc:
        raise ToolchainError(f"cannot write {target}: permission denied in {target.parent}") from exc
    except OSError as exc:
        raise ToolchainError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    return Path(tmp)


def check_writable(target: str | os.PathLike) -> None:
    """Fail now, before slow work, when `target` could not be written later."""
    _temp_beside(Path(target)).unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to `target`; rename it onto `target` only if the block succeeds.

    A missing parent folder is created; an unwritable one is a clear ToolchainError.
    """
    target = Path(target)
    tmp = _temp_beside(target)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual mode
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise ToolchainError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(target: str | os.PathLike, data) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
