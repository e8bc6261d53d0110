"""Where archir may write: names that are identifiers, paths checked to lie inside the output
folder, output places refused before any work, and clean-up of only what a run created.

archir writes only inside the output folder a command was given (or its default under
``runs/``), removes only what it created there, and writes files with the ordinary
permissions of the user's umask (``0o666 & ~umask``), never ``0600`` temp-file modes.

Every function raises :class:`~archir.errors.ArchirError` (exit code 2) with the offending
path or name and a hint; nothing here touches the disk before its checks pass.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archir.errors import ArchirError, Location

#: A run, study or spec name: starts with a letter or digit; letters, digits, ``_`` and ``-``;
#: at most 64 characters. No ``.``, ``..``, separators, spaces or control characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
NAME_HINT = (
    "a name is 1-64 letters, digits, '_' or '-', starting with a letter or digit "
    "(it becomes a folder name under runs/)"
)


class PathError(ArchirError):
    """An output path or name that archir refuses to write to."""


def check_name(name: object, what: str = "name", location: Location | None = None) -> str:
    """Return ``name`` when it is a valid identifier (:data:`NAME_PATTERN`).

    Raises:
        PathError: ``name`` is not a string, is empty, ``.``/``..``, has a separator, a dot,
            a control character, or is longer than 64 characters.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PathError(f"{what} {name!r} is not a valid name", location, NAME_HINT)
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: str | Path, *, executable: bool = False) -> None:
    """Give a file archir wrote the permissions an ordinary ``open(..., "w")`` would
    (``0o666 & ~umask``; ``0o777 & ~umask`` for folders or ``executable``)."""
    p = Path(path)
    base = 0o777 if executable or p.is_dir() else 0o666
    os.chmod(p, base & ~_umask())


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` (absolute, or relative to the current folder, like ``root``) resolved and
    checked to lie inside ``root`` (symlinks followed).

    Raises:
        PathError: ``path`` resolves outside ``root``.
    """
    r = Path(root).resolve()
    p = Path(path).resolve()
    if p != r and r not in p.parents:
        raise PathError(
            f"'{path}' resolves to {p}, outside the output folder {r}",
            hint="archir writes only inside its output folder",
        )
    return p


def _writable_dir(d: Path, what: str, arg: str) -> None:
    """The nearest existing ancestor of ``d`` must be a writable folder."""
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise PathError(
            f"{what} '{arg}': '{probe}' is not a folder", hint="give a path under a folder"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PathError(
            f"{what} '{arg}': cannot write in '{probe}' (permission denied)",
            hint="choose a place you can write to",
        )


def check_out_file(path: str | Path, what: str = "--out", *, overwrite: bool = True) -> Path:
    """Check, before any work, that a file can be written at ``path``.

    A regular file there is replaced when ``overwrite`` (default), else refused; a folder,
    device, fifo or socket there is always refused; the parent folder must exist or be
    creatable and be writable.

    Raises:
        PathError: with the path and what is wrong.
    """
    p = Path(path)
    if str(path) in ("", ".", ".."):
        raise PathError(f"{what} '{path}' is not a file name", hint="e.g. --out model.onnx")
    if p.exists() or p.is_symlink():
        try:
            st = p.stat()
        except OSError as exc:
            raise PathError(f"{what} '{path}': {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise PathError(f"{what} '{path}' is a folder", hint="give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise PathError(
                f"{what} '{path}' is not a regular file (device, fifo or socket)",
                hint="give a new file name",
            )
        if not overwrite:
            raise PathError(f"{what} '{path}' already exists", hint="give a new file name")
        if not os.access(p, os.W_OK):
            raise PathError(f"{what} '{path}': permission denied", hint="choose another file")
    _writable_dir(p.parent if str(p.parent) else Path("."), what, str(path))
    return p


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """Check, before any work, that ``path`` is (or can be created as) a writable folder.

    Raises:
        PathError: ``path`` is a file (or device, fifo ...), or no folder can be made there.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PathError(f"{what} '{path}' exists and is not a folder", hint="give a folder")
    _writable_dir(p, what, str(path))
    return p


def write_file(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, give it the permissions of
    the user's umask, then rename it to ``path``: a crash leaves the old file or the new one,
    never a torn one, and a failure leaves no temporary file behind. For writers that take a
    path (safetensors, onnx).

    Raises:
        OSError: the folder cannot be written; whatever ``write`` raises.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        normal_mode(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) with :func:`write_file`: atomic, normal permissions."""
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` with :func:`write_file`: atomic, normal permissions."""
    return write_file(path, lambda tmp: Path(tmp).write_bytes(data))


class Created:
    """What a command created, so that a failure removes exactly that and nothing else.

    ``mkdir(path)`` creates a folder (and missing parents) and remembers each folder it
    actually created; ``file(path)`` remembers a file written. :meth:`undo` removes the
    remembered files, then the remembered folders — a folder only with what is inside it
    if the folder itself was created by this object (everything in it then came from this
    command or from a worker it started). Folders that existed before are never removed.
    """

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.files: list[Path] = []

    def mkdir(self, path: str | Path) -> Path:
        p = Path(os.path.abspath(path))  # lexical: 'runs/..' is the folder it names
        missing = []
        q = p
        while not q.exists():
            missing.append(q)
            if q.parent == q:
                break
            q = q.parent
        p.mkdir(parents=True, exist_ok=True)
        self.dirs.extend(reversed(missing))  # outermost first
        return p

    def file(self, path: str | Path) -> Path:
        self.files.append(Path(os.path.abspath(path)))
        return Path(path)

    def undo(self) -> None:
        for f in self.files:
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass
        if self.dirs:
            outer = self.dirs[0]  # the outermost folder this object created
            if outer.is_dir() and not outer.is_symlink():
                shutil.rmtree(outer, ignore_errors=True)
        self.dirs, self.files = [], []
