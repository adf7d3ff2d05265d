"""The only way out of a job's sandbox: an HTTP CONNECT proxy on a Unix socket, run by the worker.

A git source is fetched inside bubblewrap with no network of its own (`--unshare-net`: a loopback
interface and nothing else). `RELAY_SOURCE` runs there, in front of git: it listens on the sandbox's
127.0.0.1, points git's proxy variables at itself, and carries each connection, byte for byte, to
the Unix socket of an `EgressProxy` outside. The proxy resolves the host named in CONNECT itself,
checks every address (`address_allowed`: globally routable unicast only, unless the host is one the
operator allowed by name), connects to one of the addresses it checked (never resolving again, so a
DNS answer that changes cannot slip past the check), and ends every tunnel at a deadline or once the
bytes received from the remote servers pass a limit.

What happened is left on the proxy for the caller's error message: `refusals` (name the host and
the reason, never the internal address it resolved to), `failures` (could not resolve or connect, no
errno: the proxy must not work as a port scanner), `exceeded` and `expired`.
"""

import contextlib
import ipaddress
import os
import re
import selectors
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HEAD_LIMIT = 8 * 1024  # bytes of request line and headers
HEAD_TIMEOUT = 10.0  # seconds for a client to send them
BUFFER = 64 * 1024
MAX_MESSAGES = 50  # refusals or failures kept: a job that retries in a loop must not fill the memory
ALLOW_HINT = "allow it with JOB_GIT_ALLOWED_HOSTS"

# IPv4 ranges that are not globally routable unicast, written out rather than left to `is_global`
# alone, whose answer varies between Python releases (and says yes to multicast).
_V4_REFUSED = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata endpoints
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast 255.255.255.255
    )
)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")  # everything outside it is local, special or unassigned
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the IPv4 address in its last 32 bits decides
_V6_REFUSED = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "2001::/23",  # IETF protocol assignments: Teredo 2001::/32, benchmarking 2001:2::/48, ORCHID
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4: an IPv4 address inside, reached through relays; deprecated (RFC 7526)
        "3fff::/20",  # documentation (RFC 9637)
    )
)

# CONNECT's target: a host name or IPv4 spelling, or a bracketed IPv6 literal (no zone), and a port.
_TARGET = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9._-]{1,253})):(?P<port>[0-9]{1,5})")
_REQUEST_LINE = re.compile(r"(?P<method>[A-Za-z]{1,20}) (?P<target>\S{1,300}) HTTP/1\.[01]")


def address_allowed(ip: IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address, and so may be connected to by any job.

    IPv6 addresses that carry an IPv4 address (IPv4-mapped, NAT64) are judged by that address; the
    other embeddings (IPv4-compatible, 6to4, Teredo) are refused whatever they carry.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_global and not any(ip in net for net in _V4_REFUSED)
    if ip.ipv4_mapped is not None:
        return address_allowed(ip.ipv4_mapped)
    if ip in _V6_NAT64:
        return address_allowed(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip not in _V6_GLOBAL_UNICAST or any(ip in net for net in _V6_REFUSED):
        return False
    return ip.is_global


class _Refused(Exception):
    """Ends a client's request with an HTTP status (None: just close)."""

    def __init__(self, status: int | None, reason: str = "", extra: str = "") -> None:
        self.status, self.reason, self.extra = status, reason, extra


def _normal_host(host: str) -> str:
    """A host as compared with the allowed list: lower case, IPv6 without brackets, IP literals in
    their canonical spelling. Other numeric spellings (`127.1`, `0x7f.1`) stay names and match only
    themselves."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).compressed
    return host


class EgressProxy:
    """A threaded HTTP CONNECT proxy on the Unix socket `socket_path`, for one job's sandbox.

    `allowed_hosts`: names (exact, any case; IP literals too) whose addresses are not checked.
    `max_bytes`: bytes received from remote servers, over all tunnels, after which every tunnel is
    closed (`exceeded`). `deadline`: a `time.monotonic()` value after which every tunnel is closed
    (`expired`). `connect_timeout`: seconds for each connection attempt to a remote address.
    `max_clients`: tunnels open at once; more connections are closed unanswered.

    Put `socket_path` in a directory the job cannot write: the proxy chmods the path after binding
    it, and unlinks it in `stop()`.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        allowed_hosts: list[str],
        max_bytes: int,
        deadline: float,
        connect_timeout: float = 10,
        max_clients: int = 16,
        ports: frozenset[int] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.allowed_hosts = frozenset(_normal_host(host) for host in allowed_hosts)
        # Ports a host not allowed by name may be reached on (None: any). A host allowed by name: any.
        self.ports = ports
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.connect_timeout = connect_timeout
        self.max_clients = max_clients
        self.refusals: list[str] = []
        self.failures: list[str] = []
        self.exceeded = False
        self.expired = False
        self.received = 0  # bytes from remote servers, all tunnels
        self._lock = threading.Lock()
        self._closing = threading.Event()  # stop(), the byte limit or the deadline: no more traffic
        self._sockets: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    def __enter__(self) -> "EgressProxy":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> "EgressProxy":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            # The sandboxed git runs as another (unprivileged) user; the directory decides who reaches it.
            os.chmod(self.socket_path, 0o666)  # noqa: S103
            listener.listen(64)
        except OSError:
            listener.close()
            self._wake_r.close()
            self._wake_w.close()
            raise
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="egress-accept", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every tunnel, wait for the threads, remove the socket file."""
        self._closing.set()
        if self._acceptor is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._acceptor.join()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self._close_all()
        # A thread inside getaddrinfo cannot be interrupted: wait a while, then leave it (a daemon).
        until = time.monotonic() + 5
        with self._lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, until - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    # --- accepting and answering ------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing.is_set():
                if not any(key.fileobj is self._listener for key, _ in selector.select()):
                    continue
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue
                with self._lock:
                    busy = len(self._handlers) >= self.max_clients
                if busy or self._closing.is_set() or self._past_deadline():
                    client.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(client,), name="egress-tunnel", daemon=True)
                with self._lock:
                    self._handlers.add(thread)
                thread.start()

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        remote = None
        try:
            head, early = self._read_head(client)
            host, port = self._parse(head)
            addresses = self._resolve(host, port)
            remote = self._connect(host, port, addresses)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if early:  # sent by the client before our answer
                remote.sendall(early)
            self._relay(client, remote)
        except _Refused as refused:
            if refused.status is not None:
                answer = f"HTTP/1.1 {refused.status} {refused.reason}\r\n{refused.extra}"
                answer += "Content-Length: 0\r\nConnection: close\r\n\r\n"
                with contextlib.suppress(OSError):
                    client.sendall(answer.encode())
        except OSError:
            pass  # the client or the remote server went away
        finally:
            for sock in (client, remote):
                if sock is not None:
                    self._untrack(sock)
                    sock.close()
            with self._lock:
                self._handlers.discard(threading.current_thread())

    def _read_head(self, client: socket.socket) -> tuple[bytes, bytes]:
        """The request line and headers, and whatever the client sent after them."""
        until = min(time.monotonic() + HEAD_TIMEOUT, self.deadline)
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > HEAD_LIMIT:
                raise _Refused(431, "Request Header Fields Too Large")
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise _Refused(408, "Request Timeout")
            client.settimeout(remaining)
            try:
                chunk = client.recv(HEAD_LIMIT + 1 - len(data))
            except TimeoutError:
                raise _Refused(408, "Request Timeout") from None
            if not chunk:
                raise _Refused(None)
            data += chunk
        head, _, early = data.partition(b"\r\n\r\n")
        if len(head) + 4 > HEAD_LIMIT:
            raise _Refused(431, "Request Header Fields Too Large")
        return head, early

    def _parse(self, head: bytes) -> tuple[str, int]:
        line = head.split(b"\r\n", 1)[0].decode("ascii", errors="replace")
        request = _REQUEST_LINE.fullmatch(line)
        if request is None:
            raise _Refused(400, "Bad Request")
        if request["method"] != "CONNECT":
            # What git sends for an http:// URL: the proxy only carries TLS it cannot read or alter.
            self._record(self.refusals, "a plain HTTP request: only https:// sources can be fetched")
            raise _Refused(405, "Method Not Allowed", "Allow: CONNECT\r\n")
        target = _TARGET.fullmatch(request["target"])
        if target is None or not 0 < int(target["port"]) < 65536:
            raise _Refused(400, "Bad Request")
        if target["v6"] is not None:
            try:
                ipaddress.IPv6Address(target["v6"])
            except ValueError:
                raise _Refused(400, "Bad Request") from None
            return f"[{target['v6']}]", int(target["port"])
        return target["name"], int(target["port"])

    def _resolve(self, host: str, port: int) -> list[tuple]:
        """The host's addresses (getaddrinfo entries), each checked unless the host is allowed by name.
        `host` is as the client spelled it, brackets included: that is how messages name it."""
        allowed = _normal_host(host) in self.allowed_hosts
        if not allowed and self.ports is not None and port not in self.ports:
            ports = ", ".join(map(str, sorted(self.ports)))
            self._record(self.refusals, f"{host}:{port}: only port(s) {ports} may be reached ({ALLOW_HINT})")
            raise _Refused(403, "Forbidden")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            infos = []
        infos = [info for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
        if not infos and allowed:
            self._record(self.failures, f"{host}: could not be resolved")
            raise _Refused(502, "Bad Gateway")
        if not allowed and not (infos and all(self._public(info[4][0]) for info in infos)):
            # One answer whether the name resolves to an internal address or not at all, and never
            # which address: a job must not learn the worker's internal names this way.
            self._record(self.refusals, f"{host}: does not resolve to a public address (loopback, private, "
                                        f"link-local and multicast addresses are refused; {ALLOW_HINT})")  # fmt: skip
            raise _Refused(403, "Forbidden")
        return infos

    @staticmethod
    def _public(address: str) -> bool:
        try:
            return address_allowed(ipaddress.ip_address(address))
        except ValueError:
            return False

    def _connect(self, host: str, port: int, infos: list[tuple]) -> socket.socket:
        """A connection to one of the addresses `_resolve` checked: by address, never by name again."""
        for family, kind, proto, _, sockaddr in infos:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or self._closing.is_set():
                break
            remote = socket.socket(family, kind, proto)
            self._track(remote)
            try:
                remote.settimeout(min(self.connect_timeout, remaining))
                remote.connect(sockaddr)
            except OSError:
                self._untrack(remote)
                remote.close()
                continue
            if self._closing.is_set():  # stop(), the limit or the deadline came while connecting
                self._untrack(remote)
                remote.close()
                raise _Refused(None)
            return remote
        # No errno, no address: "refused" against "timed out" would map the worker's network.
        self._record(self.failures, f"{host}:{port}: could not connect")
        raise _Refused(502, "Bad Gateway")

    # --- relaying ---------------------------------------------------------------------------------

    def _relay(self, client: socket.socket, remote: socket.socket) -> None:
        """Copy both ways; when one side stops sending, tell the other (half-close) and carry on with
        the other direction until it ends too, or the deadline, the byte limit or stop() ends it."""
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, remote)
            selector.register(remote, selectors.EVENT_READ, client)
            while selector.get_map():
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self._expire()
                    return
                if self._closing.is_set():
                    return
                for key, _ in selector.select(remaining):
                    source, target = key.fileobj, key.data
                    data = source.recv(BUFFER)
                    if not data:
                        selector.unregister(source)
                        with contextlib.suppress(OSError):
                            target.shutdown(socket.SHUT_WR)
                        continue
                    if source is remote and not self._count(len(data)):
                        return
                    target.settimeout(max(0.001, self.deadline - time.monotonic()))
                    try:
                        target.sendall(data)
                    except TimeoutError:
                        self._expire()
                        return

    def _count(self, size: int) -> bool:
        """Add bytes received from a remote server; False (and every tunnel closed) past the limit.
        The bytes that pass it are not forwarded."""
        with self._lock:
            self.received += size
            over = self.received > self.max_bytes
            if over:
                self.exceeded = True
        if over:
            self._close_all()
        return not over

    def _past_deadline(self) -> bool:
        if time.monotonic() >= self.deadline:
            self._expire()
            return True
        return False

    def _expire(self) -> None:
        self.expired = True
        self._close_all()

    def _close_all(self) -> None:
        """Shut every tunnel down: threads blocked on them wake up, see the end, and close them."""
        self._closing.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self._closing.is_set():  # closed between accept and here: do not start a tunnel
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def _record(self, messages: list[str], message: str) -> None:
        with self._lock:
            if message not in messages and len(messages) < MAX_MESSAGES:
                messages.append(message)


# Runs inside the sandbox, with whatever Python is there and none of this project: stdlib only.
# `python -I -c RELAY_SOURCE <unix-socket> -- <argv...>` (-I: nothing from the job's directory or
# from PYTHON* variables gets imported; the program drops "" from sys.path itself as well).
RELAY_SOURCE = r"""
import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
import os
import socket
import subprocess
import threading

PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy")


def pump(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def tunnel(conn, path):
    with conn:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with upstream:
            try:
                upstream.connect(path)
            except OSError as exc:
                sys.stderr.write("egress relay: cannot reach the proxy: %s\n" % exc)
                return
            back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
            back.start()
            pump(conn, upstream)
            back.join()


def serve(listener, path):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        threading.Thread(target=tunnel, args=(conn, path), daemon=True).start()


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.stderr.write("usage: python -I -c RELAY_SOURCE UNIX_SOCKET -- COMMAND [ARG...]\n")
        return 2
    path, argv = sys.argv[1], sys.argv[3:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = "http://127.0.0.1:%d" % listener.getsockname()[1]
    env = {name: value for name, value in os.environ.items() if name.lower() != "no_proxy"}
    env.update(dict.fromkeys(PROXY_VARIABLES, url))
    threading.Thread(target=serve, args=(listener, path), daemon=True).start()
    try:
        child = subprocess.Popen(argv, env=env)
    except OSError as exc:
        sys.stderr.write("egress relay: cannot start %s: %s\n" % (argv[0], exc))
        return 127
    code = child.wait()
    return code if code >= 0 else 128 - code


sys.exit(main())
"""
