"""A tiny TCP proxy that a test can stop and start again on the same port.

The control plane is pointed at the proxy instead of moto, so a test can simulate
"Cloud Map is down" (connection refused for new connections, reset for open ones)
without losing moto's in-memory state.

One background thread owns every socket (a selector loop); start()/stop() hand it
commands and wait until they are done, so there is no cross-thread close of a socket
that another thread is blocked on.
"""

from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
from typing import Callable


class TcpProxy:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        host: str = "127.0.0.1",
        port: int = 0,
        pick: Callable[[], list[tuple[str, int]]] | None = None,
    ):
        """`pick`, when given, is asked for the upstreams of each new connection, in the order to
        try them (the first that accepts gets it): a stand-in for DNS with several records."""
        self.upstream = (upstream_host, upstream_port)
        self.pick = pick
        self.host = host
        self.port = port
        self.accepted = 0
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._cmds: queue.Queue = queue.Queue()
        self._listener: socket.socket | None = None
        self._peer: dict[socket.socket, socket.socket] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port; the first start picks a free port if port was 0."""
        self._call("start")

    def stop(self) -> None:
        """Close the listener and reset (RST) every open connection, on both sides."""
        self._call("stop")

    def close(self) -> None:
        """Stop and end the background thread."""
        if self._closed:
            return
        self._call("close")
        self._thread.join(timeout=5)
        self._closed = True

    def open_connections(self) -> int:
        return self._call("count")

    # -- internals ----------------------------------------------------------------------------

    def _call(self, cmd: str):
        if self._closed:
            raise RuntimeError("proxy closed")
        done: queue.Queue = queue.Queue()
        self._cmds.put((cmd, done))
        self._wake_w.send(b"x")
        ok, value = done.get(timeout=10)
        if not ok:
            raise value
        return value

    def _do(self, cmd: str):
        if cmd == "start":
            if self._listener is None:
                ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind((self.host, self.port))
                ls.listen(128)
                ls.setblocking(False)
                self.port = ls.getsockname()[1]
                self._listener = ls
                self._sel.register(ls, selectors.EVENT_READ, ("listen", None))
            return self.port
        if cmd in ("stop", "close"):
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            for s in list(self._peer):
                self._drop(s, reset=True)
            return None
        if cmd == "count":
            return len(self._peer) // 2
        raise ValueError(cmd)

    def _loop(self) -> None:
        while True:
            for key, _ in self._sel.select(timeout=1.0):
                kind, _ = key.data
                sock = key.fileobj
                if kind == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    while True:
                        try:
                            cmd, done = self._cmds.get_nowait()
                        except queue.Empty:
                            break
                        try:
                            done.put((True, self._do(cmd)))
                        except Exception as e:  # noqa: BLE001 — handed back to the caller
                            done.put((False, e))
                        if cmd == "close":
                            self._sel.close()
                            self._wake_r.close()
                            self._wake_w.close()
                            return
                elif kind == "listen":
                    self._accept(sock)
                elif kind == "conn" and sock in self._peer:
                    self._forward(sock)

    def _accept(self, ls: socket.socket) -> None:
        try:
            client, _ = ls.accept()
        except (BlockingIOError, InterruptedError):
            return
        upstream = None
        for address in self.pick() if self.pick else [self.upstream]:
            try:
                upstream = socket.create_connection(address, timeout=5)
                break
            except OSError:
                continue
        if upstream is None:
            _reset(client)
            return
        self.accepted += 1
        for s in (client, upstream):
            s.setblocking(True)
            s.settimeout(5)  # sendall of small HTTP messages on loopback never blocks for long
        self._peer[client] = upstream
        self._peer[upstream] = client
        self._sel.register(client, selectors.EVENT_READ, ("conn", None))
        self._sel.register(upstream, selectors.EVENT_READ, ("conn", None))

    def _forward(self, src: socket.socket) -> None:
        dst = self._peer[src]
        try:
            data = src.recv(65536)
        except OSError:
            self._drop(src, reset=True)
            return
        if not data:
            # Orderly close from one side: close the pair (HTTP/1.1 clients and moto never
            # half-close and keep reading).
            self._drop(src, reset=False)
            return
        try:
            dst.sendall(data)
        except OSError:
            self._drop(src, reset=True)

    def _drop(self, s: socket.socket, reset: bool) -> None:
        other = self._peer.pop(s, None)
        if other is not None:
            self._peer.pop(other, None)
        for x in (s, other):
            if x is None:
                continue
            try:
                self._sel.unregister(x)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset(x)
            else:
                try:
                    x.close()
                except OSError:
                    pass


def _reset(s: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer sees a RST rather than an orderly FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
