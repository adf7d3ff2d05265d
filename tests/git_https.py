"""A git smart-HTTP server over TLS for tests: `git http-backend` as CGI behind a ThreadingHTTPServer.

`GitServer(root, cert, key)` serves every repository under `root` (`https://localhost:<port>/<name>`),
records each request (method, path, Host header) and answers paths listed in `redirects` with a 301
to another base URL, as a git host that moved would.
"""

import os
import re
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

BACKEND = "/usr/lib/git-core/git-http-backend"
GIT_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
}


def make_certificate(directory: Path, names: tuple[str, ...] = ("localhost",)) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for `names` and 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    san = ",".join([f"DNS:{name}" for name in names] + ["IP:127.0.0.1"])
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={names[0]}",
         "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def git(*args: str, cwd: Path, home: Path) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env={**GIT_ENV, "HOME": str(home)}, check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


def make_repository(root: Path, name: str) -> str:
    """A bare repository `root/name` whose branch `main` holds one commit; returns the commit's id."""
    work = root / f"{name}-work"
    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", ".", cwd=work, home=root)
    (work / "README").write_text("hello from the test server\n")
    git("add", "README", cwd=work, home=root)
    git("-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "first", cwd=work, home=root)
    git("clone", "-q", "--bare", str(work), str(root / name), cwd=root, home=root)
    return git("rev-parse", "HEAD", cwd=work, home=root)


class _Handler(BaseHTTPRequestHandler):
    server: "GitServer"

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        path, _, query = self.path.partition("?")
        self.server.requests.append((self.command, path, self.headers.get("Host", "")))
        for prefix, base in self.server.redirects.items():
            if path.startswith(prefix):
                self.send_response(301)
                self.send_header("Location", base + path[len(prefix) :] + (f"?{query}" if query else ""))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            **GIT_ENV,
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0] if self.client_address else "127.0.0.1",
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        if encoding := self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = encoding
        output = subprocess.run([BACKEND], input=body, env=env, capture_output=True, check=False).stdout
        head, payload = re.split(rb"\r?\n\r?\n", output, maxsplit=1) if output else (b"", b"")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class GitServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.cert = cert  # what a client must trust
        self.commit = ""  # the test's own record of what it committed
        self.requests: list[tuple[str, str, str]] = []
        self.redirects: dict[str, str] = {}
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def finish_request(self, request: object, client_address: object) -> None:
        # The handshake in the request's own thread: a client that never sends one blocks nobody else.
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients the proxy refused, or that gave up, close without a TLS handshake

    def __enter__(self) -> "GitServer":
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()
