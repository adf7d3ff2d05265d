"""SMS through the `twilio` client: our number (TWILIO_FROM_NUMBER) or a messaging service, a status
callback when PUBLIC_BASE_URL is set, and Twilio's errors told apart (a 429 or 20429 waits, an invalid
or opted-out number fails at once, a 5xx is tried again)."""

import logging
import threading
from typing import Any

from django.conf import settings
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from tasks import interrupts
from tasks.channels.common import Sent, by_status, retry_after
from tasks.context import PermanentError, RetryableError

logging.getLogger("twilio.http_client").setLevel(logging.WARNING)  # it logs every request's body at INFO

# Twilio error codes that another attempt would repeat: the number is not one (21211, 21614), is not
# ours (21606, 21212, 21659), has opted out at Twilio (21610), the body is refused (21617, 30007)...
PERMANENT_CODES = {20003, 20404, 21211, 21212, 21408, 21606, 21608, 21610, 21612, 21614, 21617, 21659, 30007}
OPTED_OUT_AT_TWILIO = 21610
TOO_MANY_REQUESTS = 20429


class _HttpClient(TwilioHttpClient):
    """Twilio's client, sent to TWILIO_API_BASE_URL when set (a local server in tests), keeping each
    thread's last response (its headers: Retry-After)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        super().__init__(timeout=timeout, pool_connections=True)
        self.base_url = base_url
        self.last = threading.local()

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if self.base_url:
            url = self.base_url + "/" + url.partition("://")[2].partition("/")[2]
        self.last.response = None
        response = super().request(method, url, *args, **kwargs)
        self.last.response = response
        return response


_local = threading.local()


def _client() -> Client:
    """One client per thread (its HTTP session is not shared across threads), made again when the
    settings changed (tests)."""
    key = (settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, settings.TWILIO_API_BASE_URL)
    cached = getattr(_local, "client", None)
    if cached is None or cached[0] != key:
        http = _HttpClient(settings.TWILIO_API_BASE_URL, settings.TWILIO_TIMEOUT_SECONDS)
        # environment={}: TWILIO_EDGE/TWILIO_REGION in the environment must not rewrite the host
        client = Client(settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, http_client=http, environment={})
        cached = _local.client = (key, client, http)
    return cached[1]


def sender() -> str:
    """Our address on this channel: the number, else the messaging service."""
    return settings.TWILIO_FROM_NUMBER or settings.TWILIO_MESSAGING_SERVICE_SID


def check_configured() -> None:
    if not (settings.TWILIO_ACCOUNT_SID and settings.TWILIO_AUTH_TOKEN and sender()):
        raise PermanentError(
            "SMS is not configured: set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_FROM_NUMBER "
            "(or TWILIO_MESSAGING_SERVICE_SID)"
        )


class OptedOutAtTwilio(PermanentError):
    """Twilio refused the number because it opted out there (21610): we record it too."""


def send(to: str, body: str, sender: str = "") -> Sent:
    """One SMS from `sender` (a number of ours, or a messaging service "MG..."; ours by default)."""
    check_configured()
    client = _client()
    sender = sender or settings.TWILIO_FROM_NUMBER or settings.TWILIO_MESSAGING_SERVICE_SID
    options: dict[str, Any] = {"to": to, "body": body}
    if sender.startswith("MG"):
        options["messaging_service_sid"] = sender
    else:
        options["from_"] = sender
    if settings.PUBLIC_BASE_URL:
        options["status_callback"] = settings.PUBLIC_BASE_URL + "/webhooks/twilio/status/"
    interrupts.check()
    try:
        message = client.messages.create(**options)
    except TwilioRestException as exc:
        raise _error(exc, getattr(client.http_client.last, "response", None)) from None
    except OSError as exc:  # requests' ConnectionError, Timeout
        raise RetryableError(f"Twilio did not answer: {type(exc).__name__}") from None
    segments = int(message.num_segments) if str(message.num_segments or "").isdigit() else None
    return Sent(message.sid, message.status or "queued", segments)


def _error(exc: TwilioRestException, response: Any) -> Exception:
    message = f"Twilio refused the message: {exc.msg}" + (f" (error {exc.code})" if exc.code else "")
    wait = retry_after(getattr(response, "headers", None))
    if exc.code == OPTED_OUT_AT_TWILIO:
        return OptedOutAtTwilio(message)
    if exc.status == 429 or exc.code == TOO_MANY_REQUESTS:
        return by_status(429, message, wait=wait)
    if exc.code in PERMANENT_CODES:
        return PermanentError(message)
    return by_status(exc.status or 500, message, wait=wait)
