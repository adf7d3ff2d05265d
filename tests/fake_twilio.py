"""A real local HTTP server that speaks the part of Twilio's REST API that
`twilio.rest.Client().messages.create(...)` (and `.messages(sid).fetch()`) uses, for the tests and
the notification benchmarks. The app reaches it through a `TwilioHttpClient` that rewrites the
scheme and host of every URL to `url`.

It checks HTTP Basic auth, records every attempt in `requests` and each accepted message in
`messages`, and answers from a script: numbers in `invalid_numbers` are refused (21211),
`fail_next` queues failures, and `rate_limit_per_second` refuses (429, 20429) any message that would
make more than that many accepted in the trailing second. `send_status` posts a signed status
callback to the app, as Twilio does.
"""

import base64
import json
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"
DEFAULT_ACCOUNT_SID = "AC" + "1" * 32
_MESSAGES = f"/{API_VERSION}/Accounts/{{}}/Messages"
# GSM 03.38: the basic set costs one septet, the extension set two; anything else means UCS-2.
_GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = set("^{}\\[~]|€\f")


def signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """The `X-Twilio-Signature` Twilio puts on a form POST of `params` to `url`."""
    return RequestValidator(auth_token).compute_signature(url, params)


def num_segments(body: str) -> int:
    """How many SMS segments Twilio bills `body` as (GSM-7: 160, or 153 each; UCS-2: 70, or 67 each)."""
    if all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in body):
        units, single, multi = sum(2 if c in _GSM_EXTENDED else 1 for c in body), 160, 153
    else:
        units, single, multi = len(body.encode("utf-16-le")) // 2, 70, 67
    return 1 if units <= single else -(-units // multi)


@dataclass
class SentSms:
    sid: str
    to: str
    from_: str | None
    body: str
    status_callback: str | None
    messaging_service_sid: str | None
    at: float = field(default_factory=time.time)
    status: str = "queued"  # the last status sent with `send_status`


@dataclass
class TwilioRequest:
    method: str
    path: str
    params: dict[str, str]
    auth: tuple[str, str] | None  # (user, password) of the Basic auth header, if any
    at: float = field(default_factory=time.time)
    status: int = 0  # the HTTP status answered


@dataclass
class _Failure:
    status: int
    code: int
    message: str
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news
            super().handle_error(request, client_address)


class FakeTwilio:
    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = "test-token",  # noqa: S107 (the fake's own)
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[TwilioRequest] = []
        self.messages: list[SentSms] = []
        self.invalid_numbers: set[str] = set()
        self.rate_limit_per_second: float | None = None
        self.failures: list[_Failure] = []
        self.body_failures: list[tuple[str, _Failure]] = []  # (a text the Body contains, the failure)
        self.lock = threading.Lock()
        self._accepted: deque[float] = deque()  # monotonic times of the accepted messages, for the rate limit
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeTwilio":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        """Forget the requests, messages and script (the credentials stay)."""
        with self.lock:
            self.requests.clear()
            self.messages.clear()
            self.invalid_numbers.clear()
            self.failures.clear()
            self.body_failures.clear()
            self._accepted.clear()
            self.rate_limit_per_second = None

    def fail_next(
        self, status: int, code: int, message: str, headers: dict[str, str] | None = None, times: int = 1
    ) -> None:
        """The next `times` authenticated requests get this Twilio error."""
        with self.lock:
            self.failures.extend(_Failure(status, code, message, dict(headers or {})) for _ in range(times))

    def fail_body(
        self, contains: str, status: int, code: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """The next request whose Body contains `contains` gets this Twilio error (once)."""
        with self.lock:
            self.body_failures.append((contains, _Failure(status, code, message, dict(headers or {}))))

    def message(self, sid: str) -> SentSms:
        with self.lock:
            for sms in self.messages:
                if sms.sid == sid:
                    return sms
        raise KeyError(sid)

    def send_status(self, sid: str, status: str, *, url: str | None = None, error_code: str | None = None) -> int:
        """POST a signed status callback for message `sid` to its StatusCallback (or `url`); the HTTP status."""
        sms = self.message(sid)
        target = url or sms.status_callback
        if not target:
            raise ValueError(f"message {sid} has no StatusCallback and no url was given")
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {target}")
        params = {
            "MessageSid": sid,
            "SmsSid": sid,
            "AccountSid": self.account_sid,
            "From": sms.from_ or "",
            "To": sms.to,
            "MessageStatus": status,
            "SmsStatus": status,
            "ApiVersion": API_VERSION,
        }
        if sms.messaging_service_sid:
            params["MessagingServiceSid"] = sms.messaging_service_sid
        if error_code is not None:
            params["ErrorCode"] = error_code
        sms.status = status
        request = urllib.request.Request(  # noqa: S310 (http(s) only, checked above)
            target,
            data=urllib.parse.urlencode(params).encode(),
            method="POST",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": signature(self.auth_token, target, params),
                "User-Agent": "TwilioProxy/1.1",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def resource(self, sms: SentSms) -> dict[str, Any]:
        """`sms` as Twilio's Message resource."""
        uri = f"{_MESSAGES.format(self.account_sid)}/{sms.sid}"
        date = formatdate(sms.at, usegmt=False).replace("-0000", "+0000")
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": sms.body,
            "date_created": date,
            "date_sent": None,
            "date_updated": date,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sms.from_,
            "messaging_service_sid": sms.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(num_segments(sms.body)),
            "price": None,
            "price_unit": "USD",
            "sid": sms.sid,
            "status": sms.status,
            "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
            "to": sms.to,
            "uri": f"{uri}.json",
        }


def _error(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _handler(fake: FakeTwilio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            path, _, query = self.path.partition("?")
            params = dict(urllib.parse.parse_qsl(raw or query, keep_blank_values=True))
            record = TwilioRequest(self.command, path, params, self._auth())
            with fake.lock:
                fake.requests.append(record)
            status, body, headers = self._answer(record)
            record.status = status
            self._json(status, body, headers)

        def _auth(self) -> tuple[str, str] | None:
            kind, _, encoded = self.headers.get("Authorization", "").partition(" ")
            if kind.lower() != "basic":
                return None
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return None
            return user, password

        def _answer(self, record: TwilioRequest) -> tuple[int, dict[str, Any], dict[str, str]]:
            if record.auth != (fake.account_sid, fake.auth_token):
                return 401, _error(401, 20003, "Authenticate"), {"WWW-Authenticate": 'Basic realm="Twilio API"'}
            prefix = _MESSAGES.format(fake.account_sid)
            if not record.path.startswith(f"/{API_VERSION}/Accounts/{fake.account_sid}/"):
                message = f"The requested resource {record.path} was not found"
                return 404, _error(404, 20404, message), {}
            with fake.lock:
                failure = fake.failures.pop(0) if fake.failures else None
                body = record.params.get("Body", "")
                for index, (contains, scripted) in enumerate(fake.body_failures):
                    if failure is None and contains in body:
                        failure = scripted
                        del fake.body_failures[index]
                        break
            if failure:
                return failure.status, _error(failure.status, failure.code, failure.message), failure.headers
            if record.method == "GET" and record.path.startswith(prefix + "/") and record.path.endswith(".json"):
                sid = record.path.removeprefix(prefix + "/").removesuffix(".json")
                try:
                    return 200, fake.resource(fake.message(sid)), {}
                except KeyError:
                    message = f"The requested resource {record.path} was not found"
                    return 404, _error(404, 20404, message), {}
            if record.method != "POST" or record.path != prefix + ".json":
                message = f"The requested resource {record.path} was not found"
                return 404, _error(404, 20404, message), {}
            return self._create(record.params)

        def _create(self, params: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
            to, sender, body = params.get("To", ""), params.get("From") or None, params.get("Body", "")
            service = params.get("MessagingServiceSid") or None
            if not to:
                return 400, _error(400, 21604, "A 'To' phone number is required."), {}
            if not sender and not service:
                return 400, _error(400, 21603, "A 'From' phone number is required."), {}
            if not body and not params.get("MediaUrl") and not params.get("ContentSid"):
                return 400, _error(400, 21602, "Message body is required."), {}
            if len(body) > 1600:
                return 400, _error(400, 21617, "The concatenated message body exceeds the 1600 character limit."), {}
            with fake.lock:
                if to in fake.invalid_numbers:
                    return 400, _error(400, 21211, f"The 'To' number {to} is not a valid phone number."), {}
                now = time.monotonic()
                while fake._accepted and fake._accepted[0] <= now - 1.0:
                    fake._accepted.popleft()
                if fake.rate_limit_per_second is not None and len(fake._accepted) + 1 > fake.rate_limit_per_second:
                    message = "Too Many Requests: the account's message rate was exceeded"
                    return 429, _error(429, 20429, message), {"Retry-After": "1"}
                fake._accepted.append(now)
                sms = SentSms(
                    sid="SM" + secrets.token_hex(16),
                    to=to,
                    from_=sender,
                    body=body,
                    status_callback=params.get("StatusCallback") or None,
                    messaging_service_sid=service,
                    status="accepted" if service and not sender else "queued",
                )
                fake.messages.append(sms)
            return 201, fake.resource(sms), {}

        def _json(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Twilio-Request-Id", "RQ" + secrets.token_hex(16))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


if __name__ == "__main__":  # a Twilio of its own process, for benchmarks: python -m tests.fake_twilio
    fake = FakeTwilio()
    print(fake.url, flush=True)
    fake.server.serve_forever()
