"""The egress proxy that is a git source's only way out of the sandbox: the address rule, the proxy's
refusals and limits over its Unix socket, and real `git fetch`es over https through the relay."""

import contextlib
import ipaddress
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tasks.sandbox import egress
from tasks.sandbox.egress import RELAY_SOURCE, EgressProxy, address_allowed
from tests.conftest import require_bwrap
from tests.git_https import GIT_ENV, GitServer, make_certificate, make_repository

# --- address_allowed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "140.82.112.3", "2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001::200e",
     "::ffff:8.8.8.8", "64:ff9b::808:808"],
)  # fmt: skip
def test_globally_routable_unicast_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        # IPv4: loopback, private, CGNAT, link-local (metadata), unspecified, multicast, broadcast, reserved,
        # documentation, benchmarking, IETF protocol assignments, 6to4 relay anycast
        "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
        "100.127.255.254", "169.254.169.254", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250",  # noqa: S104
        "255.255.255.255",
        "240.0.0.1", "192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1", "192.0.0.1", "192.0.0.9", "192.88.99.1",
        # IPv6: loopback, unspecified, link-local (zone included), unique local, site-local, multicast, discard,
        # documentation, benchmarking, ORCHID
        "::1", "::", "fe80::1", "fe80::1%2", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "ff0e::1", "100::1",
        "2001:db8::1", "3fff::1", "2001:2::1", "2001:10::1",
        # IPv4 inside IPv6: mapped, compatible, NAT64 (well-known and local-use), 6to4, Teredo
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "::10.0.0.1", "::8.8.8.8",
        "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "64:ff9b:1::808:808", "2002:7f00:1::1",
        "2002:a9fe:a9fe::1", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ],
)  # fmt: skip
def test_local_private_and_special_addresses_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


# --- the proxy, over its socket ----------------------------------------------------------------


class TCPServer:
    """A TCP server on `host`: sends `banner` to each connection, then `stream` bytes (if any), then
    waits for the client to close. Counts connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, banner: bytes = b"", stream: int = 0) -> None:
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self.banner, self.stream = banner, stream
        self.connections = 0
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.banner)
                for _ in range(0, self.stream, 65536):
                    conn.sendall(b"x" * 65536)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        self.closed.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
        self.listener.close()


@pytest.fixture
def servers() -> Iterator[Callable[..., TCPServer]]:
    started: list[TCPServer] = []

    def start(**kwargs: object) -> TCPServer:
        started.append(TCPServer(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a Unix socket's path must fit in 108 bytes, which pytest's tmp_path names can pass.
    path = Path(tempfile.mkdtemp(prefix="egress-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_proxy(socket_dir: Path) -> Iterator[Callable[..., EgressProxy]]:
    proxies: list[EgressProxy] = []

    def start(
        allowed_hosts: Sequence[str] = (), max_bytes: int = 10**9, seconds: float = 30, **kwargs: float
    ) -> EgressProxy:
        proxy = EgressProxy(
            socket_dir / f"proxy{len(proxies)}.sock",
            allowed_hosts=list(allowed_hosts),
            max_bytes=max_bytes,
            deadline=time.monotonic() + seconds,
            **kwargs,
        )
        proxies.append(proxy.start())
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def send(proxy: EgressProxy, request: bytes) -> tuple[str, socket.socket]:
    """Send `request` over the proxy's socket; the status line of its answer, and the connection."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(proxy.socket_path))
    head = b""
    try:
        conn.sendall(request)
        while b"\r\n\r\n" not in head and (data := conn.recv(1)):
            head += data
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed unanswered
    return head.split(b"\r\n", 1)[0].decode(), conn


def connect(proxy: EgressProxy, target: str) -> tuple[str, socket.socket]:
    return send(proxy, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


LOOPBACK_SPELLINGS = [
    "127.0.0.1", "localhost", "LocalHost", "2130706433", "0x7f.1", "0x7f000001", "017700000001", "127.1",
    "[::ffff:127.0.0.1]", "[::1]", "0", "[::]", "[::127.0.0.1]", "[64:ff9b::7f00:1]",
]  # fmt: skip
REFUSAL = (
    "{}: does not resolve to a public address (loopback, private, link-local and multicast addresses are refused; "
    "allow it with JOB_GIT_ALLOWED_HOSTS)"
)


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_the_proxy_refuses_loopback_in_every_spelling(host: str, servers: Callable, start_proxy: Callable) -> None:
    # given a server on the worker's loopback
    server = servers(banner=b"internal")
    proxy = start_proxy()

    # when a job asks for it
    status, conn = connect(proxy, f"{host}:{server.port}")

    # then
    assert status == "HTTP/1.1 403 Forbidden"
    assert read_all(conn) == b""
    assert server.connections == 0
    assert proxy.refusals == [REFUSAL.format(host)]


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.0.1", "172.16.0.1", "100.64.0.1", "169.254.169.254",
                                  "[fd00::1]", "[fe80::1]", "224.0.0.1", "255.255.255.255"])  # fmt: skip
def test_the_proxy_refuses_private_link_local_and_multicast_targets(host: str, start_proxy: Callable) -> None:
    proxy = start_proxy(connect_timeout=0.5)

    status, _ = connect(proxy, f"{host}:443")

    assert status == "HTTP/1.1 403 Forbidden"
    assert proxy.refusals == [REFUSAL.format(host)]
    assert proxy.failures == []


def test_a_name_with_one_internal_address_among_public_ones_is_refused(
    start_proxy: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def mixed(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [
            *real_getaddrinfo("8.8.8.8", port, *args, **kwargs),
            *real_getaddrinfo("10.0.0.1", port, *args, **kwargs),
        ]

    monkeypatch.setattr(egress.socket, "getaddrinfo", mixed)
    proxy = start_proxy()

    status, _ = connect(proxy, "mixed.example.com:443")

    assert status == "HTTP/1.1 403 Forbidden"
    assert proxy.refusals == [REFUSAL.format("mixed.example.com")]


def test_a_refusal_names_the_host_but_not_the_address_it_resolved_to(start_proxy: Callable) -> None:
    proxy = start_proxy()

    connect(proxy, "localhost:443")

    assert len(proxy.refusals) == 1
    assert "localhost" in proxy.refusals[0]
    assert "127.0.0.1" not in proxy.refusals[0]


def test_a_host_in_allowed_hosts_may_be_local(servers: Callable, start_proxy: Callable) -> None:
    server = servers(banner=b"internal")
    proxy = start_proxy(allowed_hosts=["LOCALHOST"])

    status, conn = connect(proxy, f"localhost:{server.port}")

    assert status == "HTTP/1.1 200 Connection established"
    assert conn.recv(8) == b"internal"
    assert proxy.refusals == []


def test_an_allowed_ip_literal_matches_only_its_own_spelling(servers: Callable, start_proxy: Callable) -> None:
    server = servers(banner=b"internal")
    proxy = start_proxy(allowed_hosts=["127.0.0.1", "[::1]"])

    allowed, conn = connect(proxy, f"127.0.0.1:{server.port}")
    other_spelling, _ = connect(proxy, f"127.1:{server.port}")
    by_name, _ = connect(proxy, f"localhost:{server.port}")

    assert allowed == "HTTP/1.1 200 Connection established"
    assert conn.recv(8) == b"internal"
    assert other_spelling == by_name == "HTTP/1.1 403 Forbidden"
    assert server.connections == 1


def test_a_dns_answer_that_changes_after_the_check_is_not_followed(
    servers: Callable, start_proxy: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a name whose first answer passes the check and whose later answers point inside; 127.0.0.2
    # stands in for a public address (the only one this test's rule allows) so that no packet leaves
    public = servers(host="127.0.0.2", banner=b"public")
    internal = servers(host="127.0.0.1", port=public.port, banner=b"internal")
    monkeypatch.setattr(egress, "address_allowed", lambda ip: ip == ipaddress.IPv4Address("127.0.0.2"))
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def rebinding(host: str, *args: object, **kwargs: object) -> list:
        if host != "rebind.example.com":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        return real_getaddrinfo("127.0.0.2" if len(lookups) == 1 else "127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(egress.socket, "getaddrinfo", rebinding)
    proxy = start_proxy()

    # when
    status, conn = connect(proxy, f"rebind.example.com:{public.port}")

    # then the proxy connected to the address it checked, and asked once
    assert status == "HTTP/1.1 200 Connection established"
    assert conn.recv(8) == b"public"
    assert internal.connections == 0
    assert lookups == ["rebind.example.com"]


def test_passing_the_byte_limit_closes_every_tunnel(servers: Callable, start_proxy: Callable) -> None:
    # given a quiet tunnel and one to a server that sends far more than the limit
    quiet = servers()
    flood = servers(stream=10 * 1024 * 1024)
    proxy = start_proxy(allowed_hosts=["127.0.0.1"], max_bytes=300_000)
    _, quiet_conn = connect(proxy, f"127.0.0.1:{quiet.port}")

    # when
    status, conn = connect(proxy, f"127.0.0.1:{flood.port}")
    received = read_all(conn)

    # then
    assert status == "HTTP/1.1 200 Connection established"
    assert len(received) <= 300_000
    assert proxy.exceeded
    assert read_all(quiet_conn) == b""  # closed as well
    late, _ = connect(proxy, f"127.0.0.1:{quiet.port}")
    assert late == ""  # and nothing new is let through


def test_the_deadline_closes_a_tunnel(servers: Callable, start_proxy: Callable) -> None:
    server = servers()  # says nothing, waits for the client
    proxy = start_proxy(allowed_hosts=["127.0.0.1"], seconds=1)
    status, conn = connect(proxy, f"127.0.0.1:{server.port}")
    started = time.monotonic()

    assert read_all(conn) == b""

    assert status == "HTTP/1.1 200 Connection established"
    assert time.monotonic() - started < 5
    assert proxy.expired
    assert server.closed.wait(5)


def test_a_request_other_than_connect_gets_405(start_proxy: Callable) -> None:
    proxy = start_proxy()

    status, conn = send(proxy, b"GET http://example.com/repo.git/info/refs HTTP/1.1\r\nHost: example.com\r\n\r\n")

    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert read_all(conn) == b""
    assert proxy.refusals == ["a plain HTTP request: only https:// sources can be fetched"]


@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT example.com HTTP/1.1", b"CONNECT example.com:0 HTTP/1.1", b"CONNECT example.com:99999 HTTP/1.1",
     b"CONNECT [fe80::1%eth0]:443 HTTP/1.1", b"CONNECT [nonsense]:443 HTTP/1.1", b"CONNECT ::1:443 HTTP/1.1",
     b"CONNECT user@example.com:443 HTTP/1.1", b"CONNECT example.com:443 HTTP/2", b"hello"],
)  # fmt: skip
def test_a_malformed_request_gets_400(request_line: bytes, start_proxy: Callable) -> None:
    proxy = start_proxy()

    status, _ = send(proxy, request_line + b"\r\n\r\n")

    assert status == "HTTP/1.1 400 Bad Request"


def test_a_request_head_over_8_kib_is_refused(start_proxy: Callable) -> None:
    proxy = start_proxy()

    status, _ = send(proxy, b"CONNECT example.com:443 HTTP/1.1\r\nX-Padding: " + b"a" * 9000)

    assert status == "HTTP/1.1 431 Request Header Fields Too Large"


def test_a_client_that_never_finishes_its_request_is_cut_off(
    start_proxy: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(egress, "HEAD_TIMEOUT", 0.5)
    proxy = start_proxy()

    status, _ = send(proxy, b"CONNECT example.com:443 HTTP/1.1\r\n")

    assert status == "HTTP/1.1 408 Request Timeout"


def test_a_failed_connection_is_recorded_without_its_cause(start_proxy: Callable) -> None:
    with socket.socket() as bound:  # a port that is taken but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        proxy = start_proxy(allowed_hosts=["127.0.0.1"])

        status, _ = connect(proxy, f"127.0.0.1:{port}")

    assert status == "HTTP/1.1 502 Bad Gateway"
    assert proxy.failures == [f"127.0.0.1:{port}: could not connect"]


def test_a_name_that_does_not_resolve_gets_the_same_answer_as_an_internal_one(
    start_proxy: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_such_name(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(egress.socket, "getaddrinfo", no_such_name)
    proxy = start_proxy()

    status, _ = connect(proxy, "git.nowhere.example:443")

    assert status == "HTTP/1.1 403 Forbidden"  # a job learns nothing of which internal names exist
    assert proxy.refusals == [REFUSAL.format("git.nowhere.example")]


def test_an_allowed_name_that_does_not_resolve_is_a_passing_failure(
    start_proxy: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_such_name(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(egress.socket, "getaddrinfo", no_such_name)
    proxy = start_proxy(allowed_hosts=["git.internal.example"])

    status, _ = connect(proxy, "git.internal.example:443")

    assert status == "HTTP/1.1 502 Bad Gateway"
    assert proxy.failures == ["git.internal.example: could not be resolved"]


def test_hosts_not_allowed_by_name_are_reached_on_the_allowed_ports_only(start_proxy: Callable) -> None:
    proxy = start_proxy(ports=frozenset({443}))

    status, _ = connect(proxy, "93.184.215.14:22")

    assert status == "HTTP/1.1 403 Forbidden"
    assert proxy.refusals == ["93.184.215.14:22: only port(s) 443 may be reached (allow it with JOB_GIT_ALLOWED_HOSTS)"]


def test_stop_closes_open_tunnels_and_removes_the_socket(servers: Callable, start_proxy: Callable) -> None:
    server = servers()
    proxy = start_proxy(allowed_hosts=["127.0.0.1"])
    assert stat.S_IMODE(os.stat(proxy.socket_path).st_mode) == 0o666  # the sandbox user connects to it
    _, conn = connect(proxy, f"127.0.0.1:{server.port}")

    proxy.stop()

    assert read_all(conn) == b""
    assert server.closed.wait(5)
    assert not proxy.socket_path.exists()


# --- git over https, through the relay and the proxy ------------------------------------------


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    root = tmp_path_factory.mktemp("git-server")
    cert, key = make_certificate(root, ("localhost", "git.conveyor.test"))
    with GitServer(root / "repos", cert, key) as server:
        server.commit = make_repository(root / "repos", "repo.git")
        server.redirects["/moved.git"] = f"https://127.0.0.1:{server.port}/repo.git"
        yield server


def relay(
    proxy: EgressProxy, argv: list[str], cwd: Path, wrap: Sequence[str] = (), **env: str
) -> subprocess.CompletedProcess:
    """`argv` as the sandbox will run it: behind RELAY_SOURCE, told nothing about the proxy."""
    return subprocess.run(
        [*wrap, sys.executable, "-I", "-c", RELAY_SOURCE, str(proxy.socket_path), "--", *argv],
        cwd=cwd, env={**GIT_ENV, "HOME": str(cwd), **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def git_fetch(proxy: EgressProxy, cert: Path, url: str, workdir: Path, wrap: Sequence[str] = ()) -> tuple:
    """A shallow fetch of `main` into a fresh repository, every git command run under `wrap`:
    (exit code, stderr, FETCH_HEAD or None)."""
    env = {**GIT_ENV, "HOME": str(workdir)}
    subprocess.run([*wrap, "git", "init", "-q", str(workdir)], env=env, check=True)
    argv = ["git", "-c", f"http.sslCAInfo={cert}", "fetch", "--depth", "1", url, "main"]
    # NO_PROXY would send git straight to the address: the relay must take it out.
    done = relay(proxy, argv, workdir, wrap, NO_PROXY="*", no_proxy="*")
    head = subprocess.run(
        [*wrap, "git", "rev-parse", "--verify", "-q", "FETCH_HEAD"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return done.returncode, done.stderr, head or None


def test_git_fetches_over_https_through_the_proxy_from_an_allowed_host(
    git_server: GitServer, start_proxy: Callable, tmp_path: Path
) -> None:
    proxy = start_proxy(allowed_hosts=["localhost"])

    code, stderr, head = git_fetch(proxy, git_server.cert, f"https://localhost:{git_server.port}/repo.git", tmp_path)

    assert code == 0, stderr
    assert head == git_server.commit
    assert proxy.refusals == proxy.failures == []
    assert 0 < proxy.received < 100_000


def test_git_cannot_fetch_from_a_host_that_resolves_to_loopback(
    git_server: GitServer, start_proxy: Callable, tmp_path: Path
) -> None:
    proxy = start_proxy()

    code, stderr, head = git_fetch(proxy, git_server.cert, f"https://localhost:{git_server.port}/repo.git", tmp_path)

    assert code != 0
    assert "CONNECT tunnel failed, response 403" in stderr
    assert head is None
    assert len(proxy.refusals) == 1
    assert proxy.refusals[0].startswith("localhost: ")


def test_git_leaves_name_resolution_to_the_proxy(
    git_server: GitServer, start_proxy: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a name that only the proxy can resolve
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: str, *args: object, **kwargs: object) -> list:
        return real_getaddrinfo("127.0.0.1" if host == "git.conveyor.test" else host, *args, **kwargs)

    monkeypatch.setattr(egress.socket, "getaddrinfo", resolve)
    proxy = start_proxy(allowed_hosts=["git.conveyor.test"])

    code, stderr, head = git_fetch(
        proxy, git_server.cert, f"https://git.conveyor.test:{git_server.port}/repo.git", tmp_path
    )

    assert code == 0, stderr
    assert head == git_server.commit


def test_a_redirect_is_followed_through_the_proxy_and_checked_again(
    git_server: GitServer, start_proxy: Callable, tmp_path: Path
) -> None:
    # given localhost is allowed, and its /moved.git answers 301 to https://127.0.0.1/repo.git
    proxy = start_proxy(allowed_hosts=["localhost"])

    code, _, head = git_fetch(proxy, git_server.cert, f"https://localhost:{git_server.port}/moved.git", tmp_path)

    assert code != 0
    assert head is None
    assert proxy.refusals == [REFUSAL.format("127.0.0.1")]


def test_a_redirect_to_an_allowed_host_is_followed(
    git_server: GitServer, start_proxy: Callable, tmp_path: Path
) -> None:
    proxy = start_proxy(allowed_hosts=["localhost", "127.0.0.1"])

    code, stderr, head = git_fetch(proxy, git_server.cert, f"https://localhost:{git_server.port}/moved.git", tmp_path)

    assert code == 0, stderr
    assert head == git_server.commit


def test_curl_goes_through_the_proxy_too(git_server: GitServer, start_proxy: Callable, tmp_path: Path) -> None:
    proxy = start_proxy()
    url = f"https://localhost:{git_server.port}/repo.git/info/refs"

    done = relay(proxy, ["curl", "-sS", "--cacert", str(git_server.cert), url], tmp_path, NO_PROXY="*")

    assert done.returncode == 56, done.stderr  # "failure in receiving network data": the CONNECT's 403
    assert proxy.refusals[0].startswith("localhost: ")


def test_the_relay_exits_with_its_commands_exit_code_and_passes_its_output(
    start_proxy: Callable, tmp_path: Path
) -> None:
    proxy = start_proxy()
    script = (
        "import os, sys; print(os.environ['https_proxy'], 'NO_PROXY' in os.environ); sys.stderr.write('e'); sys.exit(3)"
    )

    done = relay(proxy, [sys.executable, "-c", script], tmp_path, NO_PROXY="*")

    assert done.returncode == 3
    assert done.stdout.startswith("http://127.0.0.1:")
    assert done.stdout.endswith(" False\n")
    assert done.stderr == "e"


def test_git_in_a_sandbox_with_no_network_fetches_through_the_proxy(
    git_server: GitServer, start_proxy: Callable, socket_dir: Path
) -> None:
    require_bwrap()
    # given a sandbox with only its own loopback, running git as an unprivileged user when we are root
    os.chmod(socket_dir, 0o755)  # noqa: S103 (the sandbox user must reach the socket)
    cert = Path(shutil.copy(git_server.cert, socket_dir / "cert.pem"))
    wrap = ["bwrap", "--unshare-net", "--ro-bind", "/", "/", "--bind", str(socket_dir), str(socket_dir),
            "--dev", "/dev", "--proc", "/proc", "--"]  # fmt: skip
    workdirs = [socket_dir / "refused", socket_dir / "allowed"]
    for workdir in workdirs:
        workdir.mkdir()
    if os.geteuid() == 0:
        for workdir in workdirs:
            os.chown(workdir, 65534, 65534)
        wrap += ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    url = f"https://localhost:{git_server.port}/repo.git"
    refused, allowed = start_proxy(), start_proxy(allowed_hosts=["localhost"])

    # when
    direct = subprocess.run([*wrap, "curl", "-sS", "-k", url], capture_output=True, text=True, timeout=30)
    refused_code, _, refused_head = git_fetch(refused, cert, url, workdirs[0], wrap)
    code, stderr, head = git_fetch(allowed, cert, url, workdirs[1], wrap)

    # then the server cannot be reached directly from inside, and through the proxy only when allowed
    assert direct.returncode == 7, direct.stderr  # couldn't connect: the sandbox's 127.0.0.1 is its own
    assert refused_code != 0
    assert refused_head is None
    assert refused.refusals[0].startswith("localhost: ")
    assert code == 0, stderr
    assert head == git_server.commit
