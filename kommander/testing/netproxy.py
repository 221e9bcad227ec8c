"""Network partitions for real nodes on loopback: a TCP proxy on every link between two nodes.

:class:`LinkProxies` listens on one 127.0.0.1 port per ordered pair of nodes ``(a, b)`` and
forwards what arrives there to ``b``'s Raft port; node ``a`` is given that port as ``b``'s peer
endpoint (see ``LocalCluster(network=True)``), so every byte between two nodes crosses the proxy
and a test can cut any *directed* link ``a -> b``:

``stall``
    The bytes ``a`` sends to ``b`` are held, not read from ``a``'s connection: they stay in the
    kernel's buffers and then in ``a``'s own send queue, as behind a link that silently drops
    packets. Nothing is closed, so each side notices only through its own timeouts; when the link
    is healed the held bytes arrive, late, as TCP would deliver them after retransmission. A new
    connection across a stalled link is accepted and held the same way.
``reset``
    Every connection across the link is closed at once (both directions: TCP has no one-way
    reset) and new ones are closed as soon as they are accepted, until the link is healed.

Cutting ``a -> b`` alone is a one-way partition: ``b`` still hears ``a``'s peer; cut both for a
symmetric one. Traffic never leaves 127.0.0.1. One daemon thread serves every proxy with a
selector; the methods record what to do, wake it and return once it has applied the change (no
byte crosses a link after the call that cut it returns), so they may be called from any thread.
Only the standard library is used.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections.abc import Iterable, Mapping

__all__ = ["LinkProxies", "MODES"]

#: How a cut link behaves (see the module docstring).
MODES = ("stall", "reset")
#: Bytes a pipe holds for a slow receiver before it stops reading from the sender.
BUFFER_LIMIT = 256 * 1024
#: Seconds the thread waits for a connection to a node (one on loopback answers at once, or is refused).
CONNECT_TIMEOUT = 1.0
#: Seconds between the thread's checks for :meth:`LinkProxies.close` when nothing happens.
POLL_SECONDS = 0.2
#: Seconds a cut or heal waits for the thread to apply it.
APPLY_TIMEOUT = 5.0

Link = tuple[str, str]


class _Pipe:
    """One proxied connection: ``dialer`` connected to the proxy of ``target``.

    ``socks[0]`` is the dialer's side, ``socks[1]`` the target's; ``out[i]`` holds bytes waiting
    to be written to ``socks[i]``; ``links[i]`` is the directed link of the bytes read from
    ``socks[i]``.
    """

    __slots__ = ("socks", "out", "links", "eof", "closed")

    def __init__(self, client: socket.socket, upstream: socket.socket, dialer: str, target: str) -> None:
        self.socks = (client, upstream)
        self.out = (bytearray(), bytearray())
        self.links: tuple[Link, Link] = ((dialer, target), (target, dialer))
        self.eof = False
        self.closed = False


class LinkProxies:
    """A forwarding proxy for every ordered pair of ``nodes`` (node id to its Raft port)."""

    def __init__(self, nodes: Mapping[str, int]) -> None:
        self._targets = dict(nodes)
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._applied_cond = threading.Condition(self._lock)
        #: Changes asked for, and the last one the thread has applied.
        self._version = 0
        self._applied = 0
        self._cut: dict[Link, str] = {}
        self._pipes: set[_Pipe] = set()
        self._ports: dict[Link, int] = {}
        self._listeners: dict[socket.socket, Link] = {}
        self._registered: dict[socket.socket, int] = {}
        self._closing = False
        self.stats = {"connections": 0, "refused": 0, "reset": 0, "bytes": 0}
        for dialer in self._targets:
            for target in self._targets:
                if dialer != target:
                    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind(("127.0.0.1", 0))
                    listener.listen(64)
                    listener.setblocking(False)
                    self._ports[(dialer, target)] = listener.getsockname()[1]
                    self._listeners[listener] = (dialer, target)
                    self._selector.register(listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="kommander-link-proxies", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what tests call

    def port(self, dialer: str, target: str) -> int:
        """The port ``dialer`` must use as ``target``'s peer endpoint."""
        return self._ports[(dialer, target)]

    def cut(self, links: Iterable[Link], mode: str = "stall") -> None:
        """Cut the directed links ``(src, dst)``: ``src``'s bytes stop reaching ``dst``."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
        with self._lock:
            for link in links:
                if link not in self._ports and link[::-1] not in self._ports:
                    raise ValueError(f"no link {link[0]} -> {link[1]}")
                self._cut[link] = mode
        self._changed()

    def isolate(self, node: str, mode: str = "stall", direction: str = "both") -> list[Link]:
        """Cut ``node`` off from every other node: ``out`` (it is not heard), ``in`` (it hears
        nothing) or ``both``. Returns the links cut."""
        others = [n for n in self._targets if n != node]
        links = []
        if direction in ("out", "both"):
            links += [(node, n) for n in others]
        if direction in ("in", "both"):
            links += [(n, node) for n in others]
        if not links:
            raise ValueError(f"direction {direction!r}: choose from out, in, both")
        self.cut(links, mode)
        return links

    def split(self, side: Iterable[str], mode: str = "stall") -> list[Link]:
        """Cut every link between ``side`` and the other nodes, both ways."""
        inside = set(side)
        links = [(a, b) for a in self._targets for b in self._targets if (a in inside) != (b in inside)]
        self.cut(links, mode)
        return links

    def heal(self) -> None:
        """Restore every link; held bytes flow again."""
        with self._lock:
            self._cut.clear()
        self._changed()

    @property
    def cut_links(self) -> dict[Link, str]:
        with self._lock:
            return dict(self._cut)

    def close(self) -> None:
        """Stop the thread and close every socket (idempotent)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ the thread

    def _changed(self) -> None:
        """Wake the thread and wait until it has applied the links as they are now."""
        with self._lock:
            self._version += 1
            wanted = self._version
        self._wake()
        with self._applied_cond:
            if not self._applied_cond.wait_for(lambda: self._applied >= wanted or self._closing, APPLY_TIMEOUT):
                raise RuntimeError(f"the link proxies did not apply a change within {APPLY_TIMEOUT}s")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closed, or the buffer is full of wake-ups already

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    cut = dict(self._cut)
                    version = self._version
                self._apply(cut)
                with self._applied_cond:
                    self._applied = version
                    self._applied_cond.notify_all()
                for key, events in self._selector.select(POLL_SECONDS):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._drain_wakeups()
                    elif sock in self._listeners:
                        self._accept(sock, cut)  # type: ignore[arg-type]
                    else:
                        self._ready(key.data, sock, events)  # type: ignore[arg-type]
        finally:
            for pipe in list(self._pipes):
                self._close(pipe)
            for listener in self._listeners:
                listener.close()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket, cut: dict[Link, str]) -> None:
        dialer, target = self._listeners[listener]
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        if cut.get((dialer, target)) == "reset" or cut.get((target, dialer)) == "reset":
            self.stats["refused"] += 1
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self._targets[target]), timeout=CONNECT_TIMEOUT)
        except OSError:
            client.close()  # the node is down: the dialer sees its connection close at once
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats["connections"] += 1
        self._pipes.add(_Pipe(client, upstream, dialer, target))

    def _apply(self, cut: dict[Link, str]) -> None:
        """Reset what a reset cut covers; register each socket for what it may do now."""
        for pipe in list(self._pipes):
            if pipe.closed:
                continue
            if any(cut.get(link) == "reset" for link in pipe.links):
                self.stats["reset"] += 1
                self._close(pipe, reset=True)
                continue
            for i in (0, 1):
                other = 1 - i
                events = 0
                # Read from socks[i] when its direction flows and the other side keeps up.
                if not pipe.eof and pipe.links[i] not in cut and len(pipe.out[other]) < BUFFER_LIMIT:
                    events |= selectors.EVENT_READ
                if pipe.out[i]:
                    events |= selectors.EVENT_WRITE
                self._register(pipe.socks[i], events, pipe)

    def _register(self, sock: socket.socket, events: int, pipe: _Pipe) -> None:
        current = self._registered.get(sock, 0)
        if events == current:
            return
        if not events:
            self._selector.unregister(sock)
            del self._registered[sock]
        elif current:
            self._selector.modify(sock, events, pipe)
            self._registered[sock] = events
        else:
            self._selector.register(sock, events, pipe)
            self._registered[sock] = events

    def _ready(self, pipe: _Pipe, sock: socket.socket, events: int) -> None:
        if pipe.closed:
            return
        i = pipe.socks.index(sock)
        try:
            if events & selectors.EVENT_WRITE and pipe.out[i]:
                sent = sock.send(pipe.out[i])
                del pipe.out[i][:sent]
                self.stats["bytes"] += sent
            if events & selectors.EVENT_READ:
                data = sock.recv(65536)
                if data:
                    pipe.out[1 - i].extend(data)
                else:
                    pipe.eof = True
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe)
            return
        if pipe.eof and not pipe.out[1 - i] and not pipe.out[i]:
            # One side closed and nothing is left to deliver: close the other side too.
            self._close(pipe)

    def _close(self, pipe: _Pipe, reset: bool = False) -> None:
        pipe.closed = True
        self._pipes.discard(pipe)
        for sock in pipe.socks:
            if sock in self._registered:
                self._selector.unregister(sock)
                del self._registered[sock]
            if reset:
                try:
                    # Linger on, timeout 0: close sends a RST, as a reset link would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()
