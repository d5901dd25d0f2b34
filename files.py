"""Reading and writing files safely, for every entry point: hostile or broken input never costs what was written.

- `write_atomic`: a temporary file in the same folder, renamed over the target once complete. A failure half way
  (a disk full, a name that cannot be encoded, Ctrl-C) leaves the previous file as it was.
- `shown`: a path as text that can always be printed and written as UTF-8 (bytes that are not UTF-8 appear as
  `\\xNN` escapes), for messages, HTML and JSON.
- `walk`: the files under a folder, following links but each real folder (and file) once, and only regular files:
  a FIFO, a socket or a device would block or never end a read. Every entry left out comes back with its reason.
- `end_with_parent`: a child process (a data or search worker, a training run) that gets SIGTERM when its parent
  dies, even by SIGKILL (Linux's parent-death signal; elsewhere a no-op).
"""
import ctypes
import os
import signal
import stat
import sys
from typing import Callable, IO


def write_atomic(path: str, content: str | bytes | Callable[[IO], None], binary: bool | None = None) -> None:
    """Write `content` (text, bytes, or a function given the open file) to `path` through a temporary file and a
    rename. binary: open the file in binary mode (the default for bytes; needed for a function that writes bytes)."""
    binary = isinstance(content, bytes) if binary is None else binary
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def shown(path: str) -> str:
    """`path` printable and encodable as UTF-8: file-name bytes that are not UTF-8 (which Python keeps as lone
    surrogates) become \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def walk(root: str, suffixes: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """(files, skipped): the regular files under `root` whose names end with one of `suffixes` (any case; all
    files when empty), sorted, each real file once; and (path, reason) for each entry left out: a dangling or
    looping link, a link to a folder or file already walked, a FIFO, socket or device, an unreadable folder."""
    files, skipped = [], []
    seen_folders, seen_files = set(), {}
    suffixes = tuple(suffix.lower() for suffix in suffixes)

    def visit(folder: str) -> None:
        try:
            info = os.stat(folder)
        except OSError as error:
            skipped.append((folder, _link_reason(folder, error)))
            return
        if (info.st_dev, info.st_ino) in seen_folders:
            skipped.append((folder, "a link to a folder already walked"))
            return
        seen_folders.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((folder, f"unreadable folder ({error.strerror})"))
            return
        for entry in entries:
            path = entry.path
            try:
                info = os.stat(path)  # follows links
            except OSError as error:
                if not suffixes or entry.name.lower().endswith(suffixes) or entry.is_symlink():
                    skipped.append((path, _link_reason(path, error)))
                continue
            if stat.S_ISDIR(info.st_mode):
                visit(path)
                continue
            if suffixes and not entry.name.lower().endswith(suffixes):
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append((path, _kind(info.st_mode)))
            elif (info.st_dev, info.st_ino) in seen_files:
                skipped.append((path, f"the same file as {seen_files[(info.st_dev, info.st_ino)]}"))
            else:
                seen_files[(info.st_dev, info.st_ino)] = path
                files.append(path)

    visit(os.path.abspath(root))
    return files, skipped


def _link_reason(path: str, error: OSError) -> str:
    if os.path.islink(path):
        return "a looping link" if error.errno == 40 else "a dangling link"  # ELOOP
    return f"unreadable ({error.strerror})"


_PR_SET_PDEATHSIG = 1


def end_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask the kernel to send this process `sig` when its parent dies (Linux; a no-op elsewhere). Called first thing
    in a child: as a DataLoader's worker_init_fn, or a subprocess's preexec_fn. parent: the parent's pid when known
    (`functools.partial(end_with_parent, parent=os.getpid())`): a parent that died before the request was made gets
    the signal sent at once, closing the race."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
