"""Email through Django's email API (SMTP settings, or any EMAIL_BACKEND such as django-anymail's):
plain text with an HTML alternative, our own Message-ID (kept as the part's provider id), and
In-Reply-To/References when it answers an inbound email."""

import smtplib

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.utils.html import escape, linebreaks, urlize

from tasks import interrupts
from tasks.channels.common import Sent
from tasks.context import PermanentError, RetryableError


def message_id(job_id: str) -> str:
    """The Message-ID of a job's email: fixed per job, so a retry sends the same message again."""
    domain = settings.DEFAULT_FROM_EMAIL.rpartition("@")[2].strip(">") or "localhost"
    return f"<conveyor.{job_id}@{domain}>"


def as_html(text: str) -> str:
    """The text as HTML: escaped, links made links, paragraphs and line breaks kept."""
    return linebreaks(urlize(escape(text), nofollow=True, autoescape=False))


def send(
    *,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    msgid: str,
    in_reply_to: str = "",
    references: str = "",
) -> Sent:
    headers = {"Message-ID": msgid}
    if in_reply_to:
        headers["In-Reply-To"] = in_reply_to
        headers["References"] = f"{references} {in_reply_to}".strip()
    email = EmailMultiAlternatives(subject, text, settings.DEFAULT_FROM_EMAIL, [to], headers=headers)
    email.attach_alternative(html if html is not None else as_html(text), "text/html")
    interrupts.check()
    try:
        connection = get_connection(timeout=interrupts.time_left(settings.EMAIL_TIMEOUT))
        email.connection = connection
        email.send()
    except smtplib.SMTPRecipientsRefused as exc:
        code, reason = next(iter(exc.recipients.values()))
        raise _by_code(code, f"the mail server refused {to}: {code} {_text(reason)}") from None
    except smtplib.SMTPAuthenticationError as exc:
        raise PermanentError(f"the mail server refused our login: {exc.smtp_code}") from None
    except smtplib.SMTPResponseException as exc:
        raise _by_code(exc.smtp_code, f"the mail server answered {exc.smtp_code} {_text(exc.smtp_error)}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise RetryableError(f"the mail server could not be reached: {type(exc).__name__}") from None
    return Sent(msgid, "sent")


def _text(reason: bytes | str) -> str:
    return (reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason))[:300]


def _by_code(code: int, message: str) -> Exception:
    # 4xx: try later (greylisting, a full mailbox); 5xx: the server will not take it
    return RetryableError(message) if 400 <= code < 500 else PermanentError(message)
