"""Positional file reads and writes, preallocation and socket sends, with fallbacks.

With ``pread``/``pwrite`` (POSIX) threads share one descriptor freely. Without
them (Windows, or forced portable mode) a :class:`PositionalFile` seeks and
reads or writes under its own lock, so threads sharing the file never see each
other's offset. ``mmap`` was the other choice; it was not taken because a data
file that shrinks under a mapping kills the process with SIGBUS on POSIX.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import sys
import threading

from oscompat.features import Features

# A send-loop fallback for sendfile reads and sends this much at a time from a
# reused buffer, so a block never sits in memory whole. Arbitrary; 256 KiB
# was as fast as 1 MiB on loopback.
SEND_CHUNK = 256 << 10


class PositionalFile:
    """Reads and writes at an offset of one open descriptor, from any thread."""

    __slots__ = ("_file", "_lock", "fd", "native")

    def __init__(self, fd: int, features: Features, writable: bool = False) -> None:
        self.fd = fd
        self.native = features.positional_io
        self._lock = threading.Lock()
        # A second view of the same descriptor for seek+readinto; closefd=False leaves it to its owner.
        self._file = None if self.native else io.FileIO(fd, "r+b" if writable else "rb", closefd=False)

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Read up to ``len(buf)`` bytes at ``offset`` into ``buf``; fewer only at end of file. Raises ``OSError``."""
        n = 0
        size = len(buf)
        while n < size:
            if self.fd < 0:
                raise OSError(errno.EBADF, "the file was closed")
            if self._file is None:
                got = os.preadv(self.fd, [buf[n:]], offset + n)
            else:
                with self._lock:
                    self._file.seek(offset + n)
                    got = self._file.readinto(buf[n:]) or 0
            if got == 0:
                break
            n += got
        return n

    def write_all(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``. Raises ``OSError``."""
        view = memoryview(data)
        while view:
            if self.fd < 0:
                raise OSError(errno.EBADF, "the file was closed")
            if self._file is None:
                n = os.pwrite(self.fd, view, offset)
            else:
                with self._lock:
                    self._file.seek(offset)
                    n = self._file.write(view) or 0
            if n <= 0:
                raise OSError(errno.EIO, "a write made no progress")
            view = view[n:]
            offset += n

    def detach(self) -> None:
        """Stop using the descriptor (its owner is closing it): later reads and writes raise ``OSError``."""
        with self._lock:
            self.fd = -1
            self._file = None


def reserve(fd: int, path: str | os.PathLike[str], length: int, features: Features) -> None:
    """Make the file at ``path`` (open as ``fd``) ``length`` bytes long, with the space allocated where the OS can.

    Without ``posix_fallocate`` the file is extended sparse, after a check that
    the file system has the room for it, so a full disk is still found before
    the download starts (another writer can take the space later; then the
    write fails instead). Raises ``OSError`` (``ENOSPC`` when it does not fit).
    """
    if features.fallocate:
        try:
            os.posix_fallocate(fd, 0, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    grow = length - os.fstat(fd).st_size
    if grow > 0 and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < grow:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.ftruncate(fd, length)


def send_backlog(fd: int) -> int:
    """Bytes queued on TCP socket ``fd`` and not yet acknowledged by its peer (Linux ``SIOCOUTQ``).

    Only where :attr:`Features.send_backlog` is true. Raises ``OSError`` (a closed
    descriptor, or one that is not a socket).
    """
    import fcntl
    import termios

    return int.from_bytes(fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(4)), sys.byteorder, signed=True)


def send_from_file(sock: socket.socket, src: PositionalFile, offset: int, count: int, buf: bytearray) -> int:
    """Send up to ``count`` bytes of ``src`` from ``offset`` on non-blocking ``sock`` by read and send.

    The fallback for ``os.sendfile``: one read into ``buf`` (reused by the
    caller), one send. Returns the bytes sent (0 at end of file); raises
    ``BlockingIOError`` when the socket is full, ``OSError`` otherwise.
    Unsent bytes of the read are read again next time: cheap next to a copy.
    """
    view = memoryview(buf)[: min(count, len(buf))]
    got = src.readinto(view, offset)
    if got == 0:
        return 0
    return sock.send(view[:got])
