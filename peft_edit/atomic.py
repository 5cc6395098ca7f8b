"""Write a folder so that readers see the old one or the complete new one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` as a whole.

    If the body raises (or the process dies), ``path`` keeps its previous contents and the staging
    folder is removed (or, after a crash, left as a hidden ``.<name>.partial-*`` sibling).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir, not mkdtemp: mkdtemp's folder is owner-only, and the staging folder becomes the
    # saved one, which should get the permissions any new folder gets (the umask's).
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        _give_files_plain_permissions(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _give_files_plain_permissions(folder: Path) -> None:
    """Give every file under ``folder`` the mode a file made with ``open`` gets there (the umask's).

    safetensors (from 0.8) writes through an owner-only temporary file that it renames into place,
    so the weights of a saved adapter would be unreadable to anyone else while its config is not.
    The mode is read off a probe file rather than by setting the process's umask to learn it.
    """
    probe = folder / f".mode-probe-{uuid.uuid4().hex}"
    probe.touch()
    try:
        plain = probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 != plain:
            file.chmod(plain)
