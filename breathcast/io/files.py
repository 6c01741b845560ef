"""Writing export files whole or not at all, with the permissions the user's umask asks for.

Every export (DICOM REG, RTSTRUCT, CT series, NIfTI, MHA, dataset patients) is written to a hidden temporary
sibling and renamed into place, so a reader never sees half a file and an error leaves nothing. The temporary
file or folder is created with mode 0666 / 0777 and the kernel applies the process umask, as ``open`` and
``mkdir`` do for any file: ``tempfile.mkstemp``/``mkdtemp`` would make it 0600 / 0700 whatever the umask, and a
DICOM sender or planning-system import running as another user could not read the export. Data that is the
patient's own record (session logs) is made private by its own writer, not here.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from breathcast.errors import BreathcastError

__all__ = ["atomic_output_dir", "atomic_write", "check_output_dir", "temporary_sibling"]

_ATTEMPTS = 100


def _hidden_name(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"


def temporary_sibling(target: Path, directory: bool = False) -> Path:
    """Create a hidden, empty file (or folder) beside ``target``, mode 0666 (0777) less the umask.

    A file's name keeps ``target``'s suffixes last (``.u.nii.gz.1a2b3c4d.nii.gz``), so writers that choose
    the format by suffix (nibabel) see the right one; a folder's ends in ``.tmp``.

    Raises:
        BreathcastError: naming ``target`` when the folder cannot be written.
    """
    suffix = ".tmp" if directory else "".join(target.suffixes[-2:]) or ".tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            path = _hidden_name(target, suffix)
            try:
                if directory:
                    os.mkdir(path, 0o777)
                else:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary name beside {target.name}")
    except OSError as exc:
        raise BreathcastError(f"cannot write {target}: {exc.strerror or exc}") from None


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it onto ``path``; returns ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(p, lambda tmp: tmp.write_text("x")).read_text()
        'x'
    """
    path = Path(path)
    if path.is_dir():
        raise BreathcastError(f"{path}: is a folder; give a file name")
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BreathcastError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_output_dir(target: Path | str) -> None:
    """Refuse (one line naming it) an output folder that exists and is not empty; nothing is written."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BreathcastError(f"{target}: already exists and is not an empty folder; choose a new output folder")


class atomic_output_dir:  # noqa: N801 - used as a context manager, reads like a function
    """Write a folder whole or not at all: a hidden temporary sibling, renamed into place on success.

    ``target`` must not exist, or be an empty folder. On an exception the temporary folder is removed
    and ``target`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_output_dir(root / "series") as tmp:
        ...     _ = (tmp / "a.dcm").write_bytes(b"")
        >>> sorted(p.name for p in (root / "series").iterdir())
        ['a.dcm']
    """

    def __init__(self, target: Path | str) -> None:
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        check_output_dir(self.target)
        self.tmp = temporary_sibling(self.target, directory=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.target.is_dir():
                self.target.rmdir()  # empty, checked on entry
            os.rename(self.tmp, self.target)
        except OSError as exc2:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise BreathcastError(f"cannot write {self.target}: {exc2.strerror or exc2}") from None
