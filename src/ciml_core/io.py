"""Every file and folder ciml_core writes goes through this module.

One policy for all outputs (predictions, probability maps, heatmaps, reports, figures, checkpoints):

- **Atomic**: the content is written to a temporary file in the target's own folder, then
  published with one system call, so a reader (or a run killed at any moment) never sees a
  half-written file. Temporary files start with ``.`` and are removed on every failure.
- **Never overwrite unless asked**, with a primitive that fails when the target exists:
  ``os.link(tmp, target)`` creates the name only if it does not exist (``FileExistsError``
  otherwise, atomically, even when two processes race for the same name). With
  ``overwrite=True`` the file is published with ``os.replace`` (which replaces a symbolic link
  itself, never the file it points to). On a file system without hard links, an ``O_EXCL``
  placeholder reserves the name first (the same exactly-one-winner guarantee; a reader may see an
  empty file for an instant).
- **Permissions**: files 0644, folders 0755, whatever the umask or ``tempfile`` would give
  (outputs are ordinary shared files); a file that is a link to an input (a hard or symbolic
  link in an exported dataset) keeps the input's own mode.
- **One message** for a refused overwrite (:func:`already_exists_message`).
- **Folders** are built beside their target (:func:`dir_output`, :func:`make_temp_dir`) and
  swapped in whole (:func:`replace_dir`).
- **Second names and undo**: :func:`link_or_copy` (a backup or a kept copy of a finished file),
  :func:`write_with_rollback` (a file that must not outlive a failed follow-up step, e.g. a
  review mask and its log record) and :func:`append_bytes` (one record appended to a log).
- **Contained**: :func:`output_path` builds ``out / name`` and refuses a name that would resolve
  outside ``out`` (a case id such as ``../x``, an absolute path, a symbolic link leading out).
- **Clean errors**: an output folder that cannot be created or written is an
  :class:`~ciml_core.errors.OutputError` naming it, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ciml_core.errors import OutputError

#: Mode of every file written (rw-r--r--).
FILE_MODE = 0o644
#: Mode of every folder written as an output unit, e.g. a checkpoint (rwxr-xr-x).
DIR_MODE = 0o755

#: errno values meaning "this file system cannot make hard links" (fall back to O_EXCL).
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


#: What the one "already exists" message suggests by default.
OVERWRITE_HINT = "use --overwrite / overwrite=True to replace it"


def already_exists_message(path: str | os.PathLike, *, hint: str = OVERWRITE_HINT) -> str:
    """The one message for a refused overwrite: ``<path> already exists (<hint>)``.

    ``hint`` says how to get past it where ``--overwrite`` is not the way (a GUI tick box, an
    output that is never replaced).
    """
    return f"{path} already exists ({hint})"


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """Raise FileExistsError for the first existing path, unless ``overwrite``.

    An early, friendly check (before a long computation). It is *not* what protects a file:
    :func:`publish` refuses atomically at the moment of writing.
    """
    if overwrite:
        return
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(already_exists_message(path))


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` (resolved, symbolic links followed) is ``folder`` or lies below it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def output_path(out_dir: str | os.PathLike, name: str) -> Path:
    """``out_dir / name``, refused (OutputError) unless it resolves to a file directly in
    ``out_dir``: ``name`` may not hold a path separator, be ``.``/``..``/empty, be absolute,
    or be an existing symbolic link leading elsewhere."""
    out_dir = Path(out_dir)
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
           or os.path.isabs(name) or (os.altsep is not None and os.altsep in name))
    target = out_dir / name
    if bad or target.resolve().parent != out_dir.resolve():
        raise OutputError(f"output file name {name!r} would be written outside the output folder "
                          f"{out_dir}; expected a plain file name")
    return target


def check_output_dir(out: str | os.PathLike, *, what: str = "--out") -> Path:
    """Check that ``out`` is (or can be created as) a writable folder, creating nothing.

    Raises:
        OutputError: ``out`` (or one of its parents) is an existing file, or the nearest existing
            folder is not writable.
    """
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise OutputError(f"{what} {out}: {probe} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == out:
            raise OutputError(f"{what} {out}: exists and is not a folder; expected a folder")
        raise OutputError(f"{what} {out}: {probe} is a file, so no folder can be created below "
                          "it; expected a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {out}: folder {probe} is not writable")
    return out


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` with a clean OutputError naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise OutputError(f"{folder}: exists and is not a folder ({err.strerror})") from err
    except OSError as err:
        raise OutputError(f"{folder}: cannot create the output folder ({err.strerror or err})") \
            from err
    if not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    return folder


def publish(tmp: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool) -> None:
    """Give the finished temporary file ``tmp`` (same folder) the name ``target``.

    ``overwrite=False``: ``os.link`` (FileExistsError, atomically, when ``target`` exists, even
    if it appeared a microsecond ago). ``overwrite=True``: ``os.replace``. ``tmp`` is removed
    in both cases.
    """
    tmp, target = os.fspath(tmp), os.fspath(target)
    try:
        if overwrite:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise FileExistsError(already_exists_message(target)) from None
        except OSError as err:
            if err.errno not in _NO_LINK:
                raise
            # No hard links here: reserve the name with O_EXCL, then move the content onto it.
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                raise FileExistsError(already_exists_message(target)) from None
            os.close(fd)
            os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_file(
    path: str | os.PathLike,
    fill: Callable[[Path], Any],
    *,
    overwrite: bool = False,
    suffix: str = ".tmp",
) -> Path:
    """Atomically create ``path`` with ``fill(tmp_path)``, which writes the content to the
    temporary path it is given (e.g. ``nib.save(img, tmp)``; ``suffix`` is the temporary file's,
    for writers that pick the format from the name).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing is written).
        OutputError: the folder cannot be created or written, or ``path`` is a folder.
    """
    path = Path(path)
    refuse_existing([path], overwrite)
    make_dirs(path.parent)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; expected a file path")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path.parent}: cannot write in the output folder "
                          f"({err.strerror or err})") from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fill(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes the file private (0600)
        publish(tmp, path, overwrite=overwrite)
    except (FileExistsError, OutputError):
        raise
    except OSError as err:
        raise OutputError(f"{path}: cannot write the output ({err.strerror or err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Any], None],
    *,
    binary: bool = False,
    overwrite: bool = False,
) -> Path:
    """Atomically create ``path``; ``write(fh)`` fills the open file (text mode, ``newline=""``,
    UTF-8, or binary)."""

    def fill(tmp: Path) -> None:
        if binary:
            with open(tmp, "wb") as fh:
                write(fh)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                write(fh)

    return write_file(path, fill, overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Atomically create a UTF-8 text file."""
    return atomic_write(path, lambda fh: fh.write(text), overwrite=overwrite)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Atomically create a binary file."""
    return atomic_write(path, lambda fh: fh.write(data), binary=True, overwrite=overwrite)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Give the finished file ``src`` the second name ``dst``, which must not exist: a hard link
    (no data copied), or where the file system cannot link, an atomic copy (content, mode and
    times of ``src``). For backups and kept copies, never for outputs that may be edited (a hard
    link shares its content with ``src``).

    Raises:
        FileExistsError: ``dst`` exists (the one message; nothing is changed).
    """
    src, dst = Path(src), Path(dst)
    try:
        os.link(src, dst)
    except FileExistsError:
        raise FileExistsError(already_exists_message(dst)) from None
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(already_exists_message(dst)) from None
        write_file(dst, lambda tmp: shutil.copy2(src, tmp), suffix=".copy")
    return dst


#: How :func:`place_file` puts an existing file at a new name.
PLACE_MODES = ("copy", "hardlink", "symlink")


def place_file(src: str | os.PathLike, dst: str | os.PathLike, how: str = "copy") -> Path:
    """Put the existing file ``src`` (an input) at ``dst``, creating its folder: ``"copy"`` (the
    content only, so the copy is an ordinary file of this policy, not the input's mode),
    ``"hardlink"`` (no data copied; the link keeps the input's mode) or ``"symlink"`` (to the
    resolved ``src``). For building a folder output (:func:`dir_output`).

    Raises:
        OSError: the link cannot be made here (another file system, or none that links); the
            caller may copy instead.
        ValueError: an unknown ``how``.
    """
    src, dst = Path(src), Path(dst)
    if how not in PLACE_MODES:
        raise ValueError(f"how: expected one of {list(PLACE_MODES)}, got {how!r}")
    make_dirs(dst.parent)
    if how == "hardlink":
        os.link(src, dst)
    elif how == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def write_with_rollback(
    target: str | os.PathLike,
    write: Callable[[bool], Any],
    commit: Callable[[], Any],
    *,
    overwrite: bool = False,
) -> None:
    """Publish ``target`` with ``write(overwrite)``, then run ``commit()`` (e.g. append the record
    that goes with the file). When ``commit`` fails, ``target`` is put back as it was (the earlier
    file, kept meanwhile under a hidden second name by :func:`link_or_copy`, or no file at all)
    and the error is re-raised: the file never outlives its failed follow-up step."""
    target = Path(target)
    backup = None
    if overwrite and target.exists():
        backup = link_or_copy(target, target.with_name(
            f".{target.name}.{uuid.uuid4().hex[:12]}.previous"))
    try:
        write(overwrite)
        try:
            commit()
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
                backup = None
            else:
                target.unlink(missing_ok=True)
            raise
    finally:
        if backup is not None:
            backup.unlink(missing_ok=True)


def append_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Append ``data`` to ``path`` (created, with its folder and :data:`FILE_MODE`, when
    missing) in one ``write(2)`` on an ``O_APPEND`` descriptor, then ``fsync``: concurrent
    writers never interleave their records, and a crash leaves at most one truncated last one.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, created = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL,
                              FILE_MODE), True
    except FileExistsError:
        fd, created = os.open(path, os.O_WRONLY | os.O_APPEND), False
    try:
        if created:
            os.chmod(path, FILE_MODE)  # the policy's mode, whatever the umask
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def make_temp_dir(target: str | os.PathLike) -> Path:
    """A private temporary folder beside ``target`` to build a folder output in, for
    :func:`replace_dir`."""
    target = Path(target)
    make_dirs(target.parent)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise OutputError(f"{target.parent}: cannot write in the output folder "
                          f"({err.strerror or err})") from err


def _apply_modes(folder: Path) -> None:
    """:data:`DIR_MODE` on ``folder`` and every folder below, :data:`FILE_MODE` on its files;
    symbolic links and hard-linked files (an input placed by link) keep their target's mode."""
    os.chmod(folder, DIR_MODE)
    for parent, dirs, files in os.walk(folder):  # never follows a symbolic link to a folder
        for name in dirs + files:
            entry = os.path.join(parent, name)
            info = os.lstat(entry)
            if stat.S_ISDIR(info.st_mode):
                os.chmod(entry, DIR_MODE)
            elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                os.chmod(entry, FILE_MODE)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike, *,
                overwrite: bool = True, hint: str = OVERWRITE_HINT) -> Path:
    """Move the finished folder ``tmp`` (beside ``target``) to ``target``; folders get
    :data:`DIR_MODE`, files :data:`FILE_MODE` first.

    ``overwrite=True``: a folder (or file) at ``target`` is replaced; the old one is first
    renamed aside, so ``target`` always names a complete folder or, for an instant, nothing.
    ``overwrite=False``: ``target`` may be missing or an empty folder, anything else is refused
    atomically by the rename itself (FileExistsError with ``hint`` in the one message, ``tmp``
    left for the caller to remove).

    Raises:
        FileExistsError: ``overwrite`` is False and ``target`` is a file or a non-empty folder.
        OutputError: the folder cannot be moved into place.
    """
    tmp, target = Path(tmp), Path(target)
    _apply_modes(tmp)
    if not overwrite:
        try:
            os.rename(tmp, target)  # replaces an empty folder only (POSIX rename(2))
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(already_exists_message(target, hint=hint)) from None
            raise OutputError(f"{target}: cannot move the finished folder into place "
                              f"({err.strerror or err})") from err
        return target
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def dir_output(target: str | os.PathLike, *, overwrite: bool = True,
               hint: str = OVERWRITE_HINT) -> Iterator[Path]:
    """Build a folder output: ``with dir_output(target) as tmp:`` fill ``tmp`` (a temporary
    folder beside ``target``); on success it becomes ``target`` (:func:`replace_dir`, with
    ``overwrite`` and ``hint``), on any error it is removed and ``target`` is left as it was."""
    tmp = make_temp_dir(target)
    try:
        yield tmp
        replace_dir(tmp, target, overwrite=overwrite, hint=hint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace_dir


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "OVERWRITE_HINT",
    "PLACE_MODES",
    "already_exists_message",
    "append_bytes",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "dir_output",
    "is_inside",
    "link_or_copy",
    "make_dirs",
    "make_temp_dir",
    "output_path",
    "place_file",
    "publish",
    "refuse_existing",
    "replace_dir",
    "write_file",
    "write_with_rollback",
]
