"""Authoritative in-memory DNS server for tests, so resolution runs over real UDP/TCP sockets."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from types import TracebackType

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord

_RDATA: dict[str, Callable[[str], object]] = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "PTR": PTR}
_Answer = Callable[[bytes, bool], bytes | None]


def _norm(name: str) -> str:
    """Zone key: lowercase without trailing dot, so "MX.Example.test." == "mx.example.test"."""
    return name.lower().rstrip(".")


def _make_rr(name: str, rtype: str, value: str, ttl: int) -> RR:
    """Build the resource record; fails early on malformed values instead of at query time."""
    if rtype == "MX":
        preference, exchange = value.split(None, 1)
        rdata: object = MX(exchange, int(preference))
    elif rtype == "TXT":
        raw = value.encode()
        rdata = TXT([raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])
    elif rtype in _RDATA:
        rdata = _RDATA[rtype](value)
    else:
        raise ValueError(f"unsupported record type {rtype!r}")
    return RR(name + ".", getattr(QTYPE, rtype), rdata=rdata, ttl=ttl)


def _soa(name: str) -> RR:
    """SOA for the TLD of name: resolvers need it in the authority section of negative answers."""
    zone = name.rsplit(".", 1)[-1]
    soa = SOA(f"ns.{zone}", f"hostmaster.{zone}", (1, 3600, 600, 86400, 60))
    return RR(zone + ".", QTYPE.SOA, rdata=soa, ttl=60)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly n bytes from a TCP stream, or None on EOF."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _UDPServer(socketserver.UDPServer):
    """Serial UDP server: every answer is computed in memory, so no per-query thread is needed."""

    def __init__(self, address: tuple[str, int], answer: _Answer) -> None:
        super().__init__(address, socketserver.BaseRequestHandler)
        self.answer = answer

    def finish_request(self, request: tuple[bytes, socket.socket], client_address: object) -> None:
        data, sock = request
        reply = self.answer(data, False)
        if reply is not None:
            sock.sendto(reply, client_address)


class _TCPServer(socketserver.ThreadingTCPServer):
    """TCP server handling many queries per connection; tracks sockets so stop() can cut them."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], answer: _Answer) -> None:
        super().__init__(address, socketserver.BaseRequestHandler)
        self.answer = answer
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        with self.lock:
            self.open.add(request)
        try:
            while (head := _recv_exact(request, 2)) is not None:
                data = _recv_exact(request, struct.unpack("!H", head)[0])
                if data is None:
                    return
                reply = self.answer(data, True)
                if reply is not None:
                    request.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            with self.lock:
                self.open.discard(request)

    def close_connections(self) -> None:
        with self.lock:
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class TestDNSServer:
    """Authoritative DNS server on loopback (UDP+TCP, same port) whose zone tests edit live.

    Answers NOERROR/NODATA/NXDOMAIN like a real authoritative server (with SOA in authority),
    and can be told to SERVFAIL or to never answer a name to exercise resolver error paths.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self._records: dict[str, list[RR]] = {}
        self._servfail: set[str] = set()
        self._timeout: set[str] = set()
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- zone editing -------------------------------------------------------------------------

    def add(self, name: str, rtype: str, value: str, ttl: int = 60) -> None:
        """Add a record, e.g. add("example.test", "MX", "10 mx1.example.test")."""
        key = _norm(name)
        rr = _make_rr(key, rtype.upper(), value, ttl)
        with self._lock:
            self._records.setdefault(key, []).append(rr)

    def add_ptr(self, ip: str, host: str, ttl: int = 60) -> None:
        """Reverse DNS for an address: add_ptr("192.0.2.1", "mta1.example.test")."""
        self.add(ipaddress.ip_address(ip).reverse_pointer, "PTR", host, ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove all records of name, or only those of rtype."""
        key = _norm(name)
        with self._lock:
            kept = [
                rr
                for rr in self._records.get(key, [])
                if rtype is not None and rr.rtype != getattr(QTYPE, rtype.upper())
            ]
            if kept:
                self._records[key] = kept
            else:
                self._records.pop(key, None)

    def set_servfail(self, name: str) -> None:
        """Answer SERVFAIL for name (any type) until clear(name)."""
        with self._lock:
            self._servfail.add(_norm(name))

    def set_timeout(self, name: str) -> None:
        """Silently drop queries for name (any type) until clear(name)."""
        with self._lock:
            self._timeout.add(_norm(name))

    def clear(self, name: str) -> None:
        """Undo set_servfail/set_timeout for name; its records are kept."""
        key = _norm(name)
        with self._lock:
            self._servfail.discard(key)
            self._timeout.discard(key)

    # -- query handling -----------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        """True if name owns records or is an empty non-terminal (NODATA rather than NXDOMAIN)."""
        return name in self._records or any(k.endswith("." + name) for k in self._records)

    def _resolve(self, query: DNSRecord) -> DNSRecord | None:
        qname, qtype = _norm(str(query.q.qname)), query.q.qtype
        reply = query.reply(ra=0)
        with self._lock:
            self.queries.append((qname, QTYPE[qtype]))
            if qname in self._timeout:
                return None
            if qname in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            name = qname
            for _ in range(8):  # follow in-zone CNAME chains, bounded against loops
                rrs = self._records.get(name, [])
                found = [rr for rr in rrs if rr.rtype == qtype]
                cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
                if found or not cnames:
                    break
                reply.add_answer(cnames[0])
                name = _norm(str(cnames[0].rdata.label))
            for rr in found:
                reply.add_answer(rr)
                if rr.rtype == QTYPE.MX:
                    for extra in self._records.get(_norm(str(rr.rdata.label)), []):
                        if extra.rtype in (QTYPE.A, QTYPE.AAAA):
                            reply.add_ar(extra)
            if not found:
                reply.add_auth(_soa(name))
                if not self._exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
        return reply

    def _answer(self, data: bytes, tcp: bool) -> bytes | None:
        """Wire-level handler: parse, resolve, and truncate (TC bit) oversized UDP replies."""
        try:
            query = DNSRecord.parse(data)
        except DNSError:
            return None
        reply = self._resolve(query)
        if reply is None:
            return None
        packed = reply.pack()
        limit = max([512] + [rr.rclass for rr in query.ar if rr.rtype == QTYPE.OPT])
        if not tcp and len(packed) > limit:
            truncated = query.reply(ra=0)
            truncated.header.tc = 1
            packed = truncated.pack()
        return packed

    # -- lifecycle ----------------------------------------------------------------------------

    def _bind(self) -> list[socketserver.BaseServer]:
        """Bind UDP and TCP on one port; with port=0 retry until a port is free for both."""
        for _ in range(50):
            udp = _UDPServer((self.host, self.port), self._answer)
            try:
                return [udp, _TCPServer((self.host, udp.server_address[1]), self._answer)]
            except OSError as exc:
                udp.server_close()
                if self.port or exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    def start(self) -> TestDNSServer:
        self._servers = self._bind()
        self.port = self._servers[0].server_address[1]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
            if isinstance(server, _TCPServer):
                server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> TestDNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
