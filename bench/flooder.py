"""A connection flood from one address (127.0.0.1): the client ``bench.faults`` floods ``peer seed`` with.

(``bench.http_flood`` keeps its own: its slowloris clients and reconnect
pacing differ, and its figures in README.md were measured with them.)
One thread holds every connection, in three kinds:

- ``idle``: connects and never sends a byte;
- ``writer`` (slowloris): sends ``partial`` one byte every ``interval``
  seconds and never its last byte, so the request never completes;
- ``reader``: sends ``keep_requests`` at once, then reads one byte every
  ``interval`` seconds through a 4 KiB receive buffer.

With ``reconnect``, every connection the server closes is reopened, at most
``reconnect_rate`` a second, so the flood keeps holding its count: the
hardest case for a server that makes room by evicting.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import Counter


class Flooder:
    """Holds ``counts`` connections of each kind to 127.0.0.1:``port`` (see the module) until :meth:`stop`."""

    def __init__(
        self,
        port: int,
        counts: dict[str, int],
        *,
        partial: bytes,
        keep_requests: bytes = b"",
        interval: float,
        reconnect: bool,
        reconnect_rate: float,
    ) -> None:
        self.port = port
        self.counts = counts
        self.partial = partial
        self.keep_requests = keep_requests
        self.interval = interval
        self.reconnect = reconnect
        self.reconnect_rate = reconnect_rate
        self.opened = 0
        self.closed_by_server = 0
        self.connect_failures = 0
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        # socket -> [kind, bytes of ``partial`` sent so far]
        self._socks: dict[socket.socket, list[object]] = {}
        self._pending: list[str] = []
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def held(self) -> Counter[str]:
        """How many connections of each kind are open now."""
        return Counter(str(state[0]) for state in list(self._socks.values()))

    def start(self) -> None:
        """Open every connection, then keep them (and reopen them) in a thread."""
        for kind, n in self.counts.items():
            for _ in range(n):
                self._open(kind)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (bounded) and close every connection."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for sock in self._socks:
            sock.close()
        self._sel.close()

    def _open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if kind == "reader":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.settimeout(2.0)
            sock.connect(("127.0.0.1", self.port))
            if kind == "writer":
                sock.sendall(self.partial[:1])
            elif kind == "reader":
                sock.sendall(self.keep_requests)
            sock.setblocking(False)
        except OSError:
            sock.close()
            self.connect_failures += 1
            self._pending.append(kind)
            return
        self.opened += 1
        self._socks[sock] = [kind, 1]
        if kind != "reader":  # a reader's data is read slowly, in _trickle
            self._sel.register(sock, selectors.EVENT_READ)

    def _lost(self, sock: socket.socket) -> None:
        kind = str(self._socks.pop(sock)[0])
        if kind != "reader":
            self._sel.unregister(sock)
        sock.close()
        self.closed_by_server += 1
        if self.reconnect:
            self._pending.append(kind)

    def _run(self) -> None:
        next_trickle = time.monotonic() + self.interval
        budget_at = time.monotonic()
        budget = 0.0
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.01):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(4096):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._lost(sock)
            now = time.monotonic()
            budget = min(self.reconnect_rate / 10, budget + (now - budget_at) * self.reconnect_rate)
            budget_at = now
            while self._pending and budget >= 1 and not self._stop.is_set():
                budget -= 1
                self._open(self._pending.pop())
            if now >= next_trickle:
                next_trickle = now + self.interval
                self._trickle()

    def _trickle(self) -> None:
        for sock, state in list(self._socks.items()):
            kind = state[0]
            try:
                if kind == "writer":
                    sent = int(str(state[1]))
                    if sent < len(self.partial) - 1:  # never the last byte
                        sock.send(self.partial[sent : sent + 1])
                        state[1] = sent + 1
                elif kind == "reader" and sock.recv(1) == b"":
                    self._lost(sock)
            except BlockingIOError:
                continue
            except OSError:
                if sock in self._socks:
                    self._lost(sock)
