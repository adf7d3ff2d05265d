"""What providers and mail relays POST to us: inbound SMS and SMS status callbacks from Twilio (signed
with the account's auth token), and inbound email (signed with EMAIL_WEBHOOK_SECRET). A request whose
signature is missing or wrong gets 403 and nothing is stored."""

import email
import email.policy
import hashlib
import hmac
import logging
import re
from email.message import EmailMessage
from email.utils import getaddresses, parseaddr

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.utils.html import strip_tags
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from apps.messaging import conversations, deliveries
from apps.messaging.models import Channel, Conversation, Message

log = logging.getLogger(__name__)

EMPTY_TWIML = str(MessagingResponse())
SIGNATURE_HEADER = "X-Conveyor-Signature"


def called_url(request: HttpRequest) -> str:
    """The URL the caller signed: PUBLIC_BASE_URL and the path when set, else the request's own
    (proxy headers count only with TRUST_PROXY_HEADERS)."""
    if settings.PUBLIC_BASE_URL:
        return settings.PUBLIC_BASE_URL + request.get_full_path()
    return request.build_absolute_uri()


def _twilio_signed(request: HttpRequest) -> bool:
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature or not settings.TWILIO_AUTH_TOKEN:
        return False
    return RequestValidator(settings.TWILIO_AUTH_TOKEN).validate(called_url(request), request.POST, signature)


@csrf_exempt
@require_POST
def twilio_sms(request: HttpRequest) -> HttpResponse:
    """An inbound SMS: stored once per MessageSid (Twilio retries), then answered through the
    conversation; the empty TwiML says Twilio need not answer itself."""
    if not _twilio_signed(request):
        return HttpResponseForbidden("invalid or missing X-Twilio-Signature")
    sid, sender, ours = (request.POST.get(name, "") for name in ("MessageSid", "From", "To"))
    if not (sid and sender and ours):
        return HttpResponse("MessageSid, From and To are required", status=400)
    conversations.receive(
        Channel.SMS, our_address=ours, their_address=sender, text=request.POST.get("Body", ""), external_id=sid
    )
    return HttpResponse(EMPTY_TWIML, content_type="text/xml")


@csrf_exempt
@require_POST
def twilio_status(request: HttpRequest) -> HttpResponse:
    """A delivery status of a sent part. Out of order or twice, the latest status stays."""
    if not _twilio_signed(request):
        return HttpResponseForbidden("invalid or missing X-Twilio-Signature")
    sid = request.POST.get("MessageSid") or request.POST.get("SmsSid") or ""
    status = (request.POST.get("MessageStatus") or request.POST.get("SmsStatus") or "").lower()
    if not sid or not status:
        return HttpResponse("MessageSid and MessageStatus are required", status=400)
    deliveries.report(sid, status, request.POST.get("ErrorCode", ""))
    return HttpResponse(status=204)


@csrf_exempt
@require_POST
def inbound_email(request: HttpRequest) -> HttpResponse:
    """A raw MIME message (as a mail relay's webhook forwards it), signed `X-Conveyor-Signature:
    sha256=<hex HMAC-SHA256 of the body under EMAIL_WEBHOOK_SECRET>`."""
    if not settings.EMAIL_WEBHOOK_SECRET:
        return HttpResponseForbidden("inbound email is off: EMAIL_WEBHOOK_SECRET is not set")
    limit = settings.EMAIL_INBOUND_MAX_BYTES
    body = request.read(limit + 1)  # not request.body: DATA_UPLOAD_MAX_MEMORY_SIZE is not this limit
    if len(body) > limit:
        return JsonResponse({"detail": f"at most {limit} bytes"}, status=413)
    expected = b"sha256=" + hmac.new(settings.EMAIL_WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest().encode()
    given = request.headers.get(SIGNATURE_HEADER, "").encode("utf-8", "replace")
    if not hmac.compare_digest(given, expected):
        return HttpResponseForbidden(f"invalid or missing {SIGNATURE_HEADER}")
    try:
        parsed = email.message_from_bytes(body, policy=email.policy.default)
        sender = parseaddr(str(parsed.get("From", "")))[1]
        recipients = [address for _, address in getaddresses([str(v) for v in parsed.get_all("To", [])]) if address]
        message_id = _message_id(parsed.get("Message-ID"))
        in_reply_to = _message_id(parsed.get("In-Reply-To"))
        references = " ".join(MESSAGE_ID.findall(str(parsed.get("References", ""))[:20_000])[-50:])
        subject = " ".join(str(parsed.get("Subject", "")).split())
        text = _text_of(parsed)
    except Exception as exc:  # a malformed message, whatever part of the parser it trips
        return JsonResponse({"detail": f"not a readable MIME message: {type(exc).__name__}"}, status=400)
    if not sender or "@" not in sender or any(c in sender for c in "\r\n\0"):
        return JsonResponse({"From": ["A sender address is required."]}, status=400)
    ours = recipients[0] if recipients else parseaddr(settings.DEFAULT_FROM_EMAIL)[1]
    if in_reply_to and in_reply_to not in references.split():
        references = f"{references} {in_reply_to}".strip()
    message = conversations.receive(
        Channel.EMAIL,
        our_address=ours.lower()[:320],
        their_address=sender.lower()[:320],
        text=text,
        external_id=message_id or "sha256:" + hashlib.sha256(body).hexdigest(),
        subject=subject,
        references=references,
        conversation=_thread(in_reply_to, references, sender.lower()),
    )
    return JsonResponse({"stored": message is not None}, status=202 if message else 200)


# A message id as RFC 5322 writes it, and nothing else: an id decoded from a stranger's header must
# never carry a line break (or anything) into the headers of our reply.
MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>")


def _message_id(value: object) -> str:
    match = MESSAGE_ID.fullmatch(str(value or "").strip())
    return match.group(0) if match else ""


def _thread(in_reply_to: str, references: str, sender: str) -> Conversation | None:
    """The conversation an answer belongs to, by the ids of ours it cites (In-Reply-To, References)."""
    cited = [i for i in [in_reply_to, *references.split()] if i]
    if not cited:
        return None
    ours = (
        Message.objects.filter(
            conversation__channel=Channel.EMAIL, conversation__their_address=sender, external_id__in=cited[:50]
        )
        .select_related("conversation")
        .first()
    )
    return ours.conversation if ours else None


def _text_of(parsed: EmailMessage) -> str:
    """The plain text of a message: its text/plain part, else its HTML without the tags; bounded."""
    part = parsed.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    content = part.get_content()
    if part.get_content_subtype() == "html":
        content = strip_tags(content)
    return str(content).strip()[:100_000]
