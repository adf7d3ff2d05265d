"""A real local HTTP server that speaks the OpenAI chat-completions API and the Anthropic messages API
(streaming and not), for the tests and the AI benchmark. The app reaches it through OPENAI_BASE_URL
(`<url>/v1`) and ANTHROPIC_BASE_URL (`<url>`).

It records every request (path, key, body) and answers from a script: queue `(status, headers,
message)` answers with `fail_next`, otherwise it streams `tokens`, `token_delay` seconds apart.
An error body echoes the key it was sent, as some servers do, so that redaction is put to the test.
"""

import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    path: str
    key: str
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # wall clock, when the first token was written
    aborted: bool = False  # the client went away before the answer's end


@dataclass
class Script:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    token_delay: float = 0.0
    response_delay: float = 0.0
    failures: list[tuple[int, dict[str, str], str]] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news
            super().handle_error(request, client_address)


class FakeLLM:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script = Script()
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeLLM":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self, **script: Any) -> None:
        with self.lock:
            self.requests.clear()
            self.script = Script(**script)

    def cut_next(self) -> None:
        """The next request gets the start of a stream, then the connection drops."""
        with self.lock:
            self.script.failures.append((0, {}, ""))

    def fail_next(self, status: int, message: str = "", headers: dict[str, str] | None = None) -> None:
        with self.lock:
            self.script.failures.append((status, headers or {}, message))


def _handler(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams, as real providers serve them

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            key = self.headers.get("x-api-key") or self.headers.get("Authorization", "").removeprefix("Bearer ")
            anthropic = self.path.startswith("/v1/messages")
            if not anthropic and self.path != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            record = Recorded(self.path, key, body)
            self.record = record
            with fake.lock:
                fake.requests.append(record)
                failure = fake.script.failures.pop(0) if fake.script.failures else None
                script = fake.script
            if failure and failure[0] == 0:  # cut: start streaming, then drop the connection
                return self._cut()
            if failure:
                status, headers, message = failure
                message = message or f"request refused for key {key}"
                error = (
                    {"type": "error", "error": {"type": "api_error", "message": message}}
                    if anthropic
                    else {"error": {"message": message, "type": "api_error", "code": status}}
                )
                return self._json(status, error, headers)
            time.sleep(script.response_delay)
            model = body.get("model", "fake")
            if anthropic:
                self._anthropic(body, model, script)
            else:
                self._openai(body, model, script)

        def _cut(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = (
                b'data: {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", '
                b'"choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": null}]}\n\n'
            )
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _events(self, events: list[tuple[str | None, dict | str]], delay: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for name, data in events:
                    payload = data if isinstance(data, str) else json.dumps(data)
                    chunk = ((f"event: {name}\n" if name else "") + f"data: {payload}\n\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    if self.record.first_token_at is None and name in (None, "content_block_delta"):
                        self.record.first_token_at = time.time()
                    if delay and name in (None, "content_block_delta"):
                        time.sleep(delay)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.record.aborted = True

        def _openai(self, body: dict, model: str, script: Script) -> None:
            text = "".join(script.tokens)
            usage = {
                "prompt_tokens": 5,
                "completion_tokens": len(script.tokens),
                "total_tokens": 5 + len(script.tokens),
            }
            base = {"id": "chatcmpl-1", "created": 0, "model": model}
            if not body.get("stream"):
                message = {"role": "assistant", "content": text}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                return self._json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            chunk = {**base, "object": "chat.completion.chunk"}
            events: list[tuple[str | None, dict | str]] = [
                (None, {**chunk, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})
                for t in script.tokens
            ]
            events.append((None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            events.append((None, {**chunk, "choices": [], "usage": usage}))
            events.append((None, "[DONE]"))
            self._events(events, script.token_delay)

        def _anthropic(self, body: dict, model: str, script: Script) -> None:
            text = "".join(script.tokens)
            message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "stop_sequence": None}
            if not body.get("stream"):
                content = [{"type": "text", "text": text}]
                usage = {"input_tokens": 5, "output_tokens": len(script.tokens)}
                return self._json(200, {**message, "content": content, "stop_reason": "end_turn", "usage": usage})
            start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 0}}
            events: list[tuple[str | None, dict | str]] = [
                ("message_start", {"type": "message_start", "message": start}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
            ]  # fmt: skip
            events += [
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": t}})
                for t in script.tokens
            ]  # fmt: skip
            events += [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": len(script.tokens)}}),
                ("message_stop", {"type": "message_stop"}),
            ]  # fmt: skip
            self._events(events, script.token_delay)

    return Handler


if __name__ == "__main__":  # a provider of its own process, for benchmarks: python -m tests.fake_llm DELAY_S
    fake = FakeLLM()
    fake.reset(response_delay=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
    print(fake.url, flush=True)
    fake.server.serve_forever()
