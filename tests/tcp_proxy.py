"""A TCP proxy on 127.0.0.1 that a test can cut and restore: an S3 endpoint that becomes unreachable and comes
back with its data (stopping moto's server would lose its in-memory buckets).

``cut()`` closes the listening socket and every open connection: clients get "connection refused" from then on.
``restore()`` listens again on the same port. ``cut_on(pattern, nth)`` cuts by itself when the ``nth`` HTTP request
whose request line matches ``pattern`` arrives, before forwarding it: "the endpoint died during this write".
With ``after``, that request is held until a request matching ``after`` has gone through (plus ``grace_s``), then
the endpoint dies: a slow request followed by an outage, which orders the cut after another client's write.
"""

from __future__ import annotations

import re
import socket
import threading
import time


class CuttableProxy:
    _REQUEST_LINE = re.compile(rb"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.requests: list[str] = []  # "PUT /bucket/key?query" of every request seen, in order
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._cut_pattern: re.Pattern | None = None
        self._cut_nth = 0
        self._matches = 0
        self._after: re.Pattern | None = None
        self._after_seen = threading.Event()
        self._grace_s = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def start(self) -> CuttableProxy:
        self._listen()
        return self

    def cut_on(self, pattern: str, nth: int = 1, after: str | None = None, grace_s: float = 0.5) -> None:
        """Cut when the ``nth`` request whose line ("PUT /bucket/key?query") matches ``pattern`` arrives (held until a
        request matching ``after`` was seen, plus ``grace_s``, if given)."""
        with self._lock:
            self._cut_pattern, self._cut_nth, self._matches = re.compile(pattern), nth, 0
            self._after, self._grace_s = (re.compile(after) if after else None), grace_s
            self._after_seen.clear()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self._cut_pattern = None
            self.cuts += 1
        if listener is not None:
            listener.close()
        for c in conns:
            _close(c)

    def restore(self) -> None:
        if self._listener is None:
            self._listen()

    close = cut

    # ---- internals ---------------------------------------------------------------------------------------
    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.1)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if from_client:
                    buf = tail + data
                    for m in self._REQUEST_LINE.finditer(buf):
                        if m.end() > len(tail) and self._seen(f"{m.group(1).decode()} {m.group(2).decode(errors='replace')}"):
                            if self._after is not None:
                                self._after_seen.wait(timeout=120)
                                time.sleep(self._grace_s)
                            self.cut()
                            return
                    tail = buf[-1024:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _seen(self, line: str) -> bool:
        """Record a request; True if it triggers the cut."""
        with self._lock:
            self.requests.append(line)
            if self._after is not None and self._after.search(line):
                self._after_seen.set()
            if self._cut_pattern is None or not self._cut_pattern.search(line):
                return False
            self._matches += 1
            return self._matches == self._cut_nth


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
