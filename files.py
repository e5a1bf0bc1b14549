"""File safety: atomic writes with one durability rule, locks that name their holder, temporary names, cleaning up
after dead processes, and finding the files a flag names."""

import contextlib
import fcntl
import glob
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

import psutil


def temporary_path(path: Path) -> Path:
    """A name beside `path` to write it under before renaming it into place, unique to this process even among
    containers on several nodes that share the filesystem (where process ids coincide)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through write(file) under a temporary name, flush it to disk, then rename it into place: a
    crash leaves the previous file whole, and an error removes the temporary file and is a one-line OSError
    naming the path."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = os_error_in(error)
        if cause is None:
            raise
        raise OSError(f"could not write {path}: {cause.strerror or cause}") from None


def write_text_atomically(path: str | Path, text: str) -> None:
    """write_atomically for a text, in UTF-8."""
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def append_atomically(path: str | Path, text: str) -> None:
    """Append a text to a file, whole or not at all, and flush it to disk: a write that fails (a full disk) leaves
    no part of it and is a one-line OSError naming the file."""
    data = text.encode("utf-8")
    try:
        with open(path, "ab", buffering=0) as file:
            start = file.tell()
            try:
                written = 0
                while written < len(data):  # an unbuffered write may write part of the data, then fail
                    written += file.write(data[written:])
                os.fsync(file.fileno())
            except OSError:
                file.truncate(start)
                raise
    except OSError as error:
        raise OSError(f"could not write {path}: {error.strerror or error}") from None


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error, if any: torch.save reports a failed write as a RuntimeError whose context is
    the file's OSError (no space left, file too large)."""
    if isinstance(error, RuntimeError):
        error = error.__context__
    return error if isinstance(error, OSError) else None


def write_folder_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(folder) into a temporary folder beside path, then rename it to path (which may be an empty folder):
    a crash or an error never leaves a half-written folder, and the temporary one is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stray_temporary_files([path])  # those of writers killed with SIGKILL, which nothing can clean up after
    temporary = temporary_path(path)
    temporary.mkdir()  # mkdir, unlike mkdtemp, keeps the umask
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


@contextlib.contextmanager
def holding_lock(lock: IO, flag: str, taken: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive flock on an open lock file, with this process's id written in it, and remove the file
    when done (while still holding it). When another process holds it, taken(its id, or "" if unknown) is called
    first, which may raise (refuse to wait) or return (then this waits). The operating system releases the lock
    when its holder ends, however it ends, so a crash never blocks the next process. A file system without flock
    (ENOLCK, EOPNOTSUPP) is a one-line ValueError that names the flag to change."""
    path = Path(lock.name)
    with contextlib.ExitStack() as reopened:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                taken(lock.read().strip())
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as error:
                raise ValueError(f"{flag}: the file system cannot lock {lock.name} ({error.strerror or error}); "
                                 f"choose a {flag} on a local disk") from None
            if still_at(lock, path):
                break
            lock = reopened.enter_context(open(path, "a+"))  # its holder removed the file locked: lock the new one
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def still_at(lock: IO, path: Path) -> bool:
    """Whether a lock file just locked is still the one at `path`. Its holder removes it on release, while still
    holding it, so a process that opened it before then has locked a file that no longer locks anything, and must
    open the path again."""
    try:
        return os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False


def remove_stray_temporary_files(paths: list[Path]) -> list[Path]:
    """Remove the temporary files (or folders) of these paths (<name>.<tag>.tmp) whose writer, a process of this
    machine, no longer exists: a process killed while saving leaves one. Those of live processes and of other
    machines stay. Returns the files removed."""
    removed = []
    for path in paths:
        prefix = f"{path.name}."
        for temporary in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
            if written_by_a_dead_process(temporary.name[len(prefix):-len(".tmp")], temporary):
                if temporary.is_dir() and not temporary.is_symlink():  # a folder written atomically
                    shutil.rmtree(temporary, ignore_errors=True)
                else:
                    temporary.unlink(missing_ok=True)
                removed.append(temporary)
    return removed


def written_by_a_dead_process(tag: str, temporary: Path) -> bool:
    """Whether a temporary file's tag, <pid> or this machine's name and a pid (<host>.<pid>, <pid>-<host>, ...),
    names a process that no longer exists, or one that started after the file was last written: process ids are
    reused (they wrap at 32,768 on many Linux machines, and threads take them too), and its writer cannot have."""
    host = re.escape(socket.gethostname())
    patterns = (r"(\d+)", rf"{host}[.-](\d+)", rf"(\d+)[.-]{host}", rf"{host}-(\d+)-[0-9a-f]+")
    match = next(filter(None, (re.fullmatch(pattern, tag) for pattern in patterns)), None)
    if match is None:
        return False
    try:
        return psutil.Process(int(match[1])).create_time() > temporary.lstat().st_mtime
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, OverflowError, ValueError, FileNotFoundError):  # another user's, no id at all
        return False


def remove_temporary_files(folder: Path) -> None:
    """All temporary files of a folder, left by processes that died, where no live one can be writing (the caller
    holds the folder's lock)."""
    for path in folder.glob("*.tmp"):
        path.unlink(missing_ok=True)


def unwritable_folder(folder: Path) -> str | None:
    """Why files cannot be written in `folder`, created if need be, else None: a file stands in its way, or the
    nearest folder that exists takes no new folder (read-only, or a file system such as /sys). It is tried, a
    folder made and removed at once: os.access answers by the permission bits, which say yes to root on /sys."""
    if blocking := file_in_the_way(folder):
        return f"{blocking} is a file, not a folder"
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    return None


def file_in_the_way(folder: Path) -> Path | None:
    """The file, if any, that stands where `folder` or one of its parents should be a folder."""
    return next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)


def resolve_files(pattern: str, extensions: tuple[str, ...], flag: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob, as a sorted list of files with those extensions."""
    path = Path(pattern)
    if path.is_dir():
        candidates = [file for file in path.rglob("*") if file.is_file()]
    elif path.is_file():
        candidates = [path]
    else:
        candidates = [Path(file) for file in glob.glob(pattern, recursive=True)]
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ValueError(f"{flag}: {pattern} is not a regular file (a FIFO, a device, or a link to one), which "
                         f"could be read forever")
    # Only regular files: a FIFO or a link to /dev/zero among them would never end.
    files = sorted(file for file in candidates if file.suffix in extensions and file.is_file())
    if not files:
        raise FileNotFoundError(f"{flag}: no {', '.join(extensions)} files found at {pattern!r}")
    return files


def same_files(pattern: str | None, other: str | None, extensions: tuple[str, ...]) -> bool:
    """Whether two patterns (see resolve_files) name the same files, now."""
    if pattern == other:
        return True
    try:
        return [file.resolve() for file in resolve_files(pattern or "", extensions, "")] == \
            [file.resolve() for file in resolve_files(other or "", extensions, "")]
    except FileNotFoundError:
        return False
