"""Opening checkpoint files without trusting what sits at the path.

A FIFO named `model.safetensors` makes a plain `open()` wait for a writer forever, and a character device
(`/dev/zero` behind a symlink) reads without end. Every checkpoint file is therefore opened non-blocking and
checked to be a regular file (symlinks to one are fine: the HF cache is made of them) before a byte is read.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from giants.checkpoint.errors import CheckpointError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


def check_regular(path: str | os.PathLike) -> int:
    """The size of `path`, which must be a regular file (following symlinks); CheckpointError otherwise."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot open: {e.strerror or e}", file=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"not a regular file ({_kind(st.st_mode)})", file=path)
    return st.st_size


def open_regular(path: str | os.PathLike, buffering: int = -1) -> BinaryIO:
    """`open(path, "rb")` that refuses (never blocks on) anything but a regular file: the file is opened
    with O_NONBLOCK, checked with fstat on the very descriptor that is then read, and only then set back to
    blocking. OSError and refusals raise CheckpointError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"cannot open: {e.strerror or e}", file=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"not a regular file ({_kind(mode)})", file=path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | os.PathLike) -> str:
    """A small UTF-8 file (a JSON config or index) read through `open_regular`."""
    with open_regular(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"not valid UTF-8: {e}", file=path) from None


def exists(path: Path) -> bool:
    """Whether anything (a file, a FIFO, a dangling symlink) is at `path`: such an entry is read and refused,
    never silently skipped as absent."""
    return os.path.lexists(path)
