"""Splitting a text to each channel's rules (the text is a model's or a user's: anything may be in it).

- **Discord**: parts of at most 2,000 characters, cut at a paragraph, else a line, else a sentence,
  else a word boundary; never inside a link, an inline code span or a Markdown emphasis pair; a cut
  inside a fenced code block closes the fence and opens it again, with its language, in the next part.
- **SMS**: parts of at most 1,600 characters (Twilio's limit for one message), cut the same way. Each
  part is sent as GSM-7 when every character of it allows, else as UCS-2 (UTF-16), and says how many
  segments the carrier bills for it; with smart encoding, typographic characters that have a plain
  GSM-7 twin (curly quotes, dashes, the ellipsis, a no-break space) are replaced first, so that one
  quote does not double the cost.
- **Email**: not split.
"""

import re
from dataclasses import dataclass

DISCORD_LIMIT = 2000
SMS_LIMIT = 1600

# --- where a cut may go ---------------------------------------------------------------------------

# Boundaries by preference: after a paragraph, after a line, after a sentence, after a word.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n+"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?…])[\"')\]]*[ \t]+"),
    re.compile(r"[ \t]+"),
)
# Spans a cut must not fall in: links, inline code, emphasis pairs (all on one line).
_PROTECTED = re.compile(
    r"\[[^\]\n]*\]\([^)\s]*\)"  # [text](url)
    r"|<https?://[^>\s]+>"  # <url>
    r"|https?://\S+"  # a bare url
    r"|`[^`\n]+`"  # inline code
    r"|\*\*[^*\n]+?\*\*|__[^_\n]+?__|~~[^~\n]+?~~|\|\|[^|\n]+?\|\|"  # bold, underline, strike, spoiler
    r"|(?<![*\w])\*[^*\n]+?\*(?![*\w])|(?<![_\w])_[^_\n]+?_(?![_\w])"  # italics
)
_FENCE = re.compile(r"^[ \t]*```([\w+#.-]*)[^\n]*$", re.MULTILINE)
# A part should not be tiny because a boundary of a better kind came early in it.
_SMALLEST_SHARE = 1 / 3


@dataclass(frozen=True)
class _Fence:
    start: int  # where the opening ``` line starts
    body: int  # where its body starts (after the opening line)
    end: int  # where the closing ``` line starts (the text's end when the fence is never closed)
    language: str


def _fences(text: str) -> list[_Fence]:
    fences = []
    marks = list(_FENCE.finditer(text))
    index = 0
    while index < len(marks):
        opening = marks[index]
        closing = marks[index + 1] if index + 1 < len(marks) else None
        body = min(len(text), opening.end() + 1)
        fences.append(_Fence(opening.start(), body, closing.start() if closing else len(text), opening.group(1)))
        index += 2
    return fences


def _protected(text: str, fences: list[_Fence], limit: int) -> list[tuple[int, int]]:
    spans = []
    for match in _PROTECTED.finditer(text):
        start, end = match.span()
        if end - start < limit // 2 and not any(f.start <= start < f.end for f in fences):
            spans.append((start, end))
    # A fence's own lines are never cut: the opening line, and the closing one.
    # (A cut right after the opening line would leave that line alone at a part's end; one right
    # before the closing line would leave it alone at the next part's start.)
    for fence in fences:
        spans.append((fence.start, fence.body + 1))
        closing_end = text.find("\n", fence.end)
        spans.append((fence.end - 1, closing_end if closing_end != -1 else len(text)))
    return spans


def _cut(text: str, start: int, end: int, avoid: list[tuple[int, int]], prefer_lines: bool) -> int:
    """The best place to cut `text` between `start` and `end` (exclusive of start): the last boundary of
    the most preferred kind that lies past a third of the window and outside every span to avoid; else
    the last boundary of any kind; else `end` (a word longer than a part)."""

    def allowed(position: int) -> bool:
        return not any(s < position < e for s, e in avoid)

    boundaries = _BOUNDARIES[:2] if prefer_lines else _BOUNDARIES
    window = text[start:end]
    smallest = start + int((end - start) * _SMALLEST_SHARE)
    fallback = None
    for boundary in boundaries:
        for match in reversed(list(boundary.finditer(window))):
            position = start + match.end()
            if position <= start or not allowed(position):
                continue
            if position >= smallest:
                return position
            fallback = fallback or position
            break
    if fallback:
        return fallback
    position = end
    while position > start + 1 and not allowed(position):
        position -= 1
    return position if position > start + 1 else end


def split_text(text: str, limit: int) -> list[str]:
    """Plain text in parts of at most `limit` characters, cut at the best boundaries."""
    return _split(text, limit, markdown=False)


def split_discord(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    return _split(text, limit, markdown=True)


def _split(text: str, limit: int, *, markdown: bool) -> list[str]:
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    fences = _fences(text) if markdown else []
    avoid = _protected(text, fences, limit) if markdown else []
    parts: list[str] = []
    position, reopen = 0, ""
    while position < len(text):
        budget = limit - len(reopen)
        if len(text) - position <= budget:
            parts.append(reopen + text[position:])
            break
        fence = next((f for f in fences if f.body <= position < f.end), None)
        end = position + budget
        inside = next((f for f in fences if f.body < end <= f.end), None)
        if inside is not None:
            end -= len("\n```")  # room to close the fence in this part
        cut = _cut(text, position, end, avoid, prefer_lines=inside is not None or fence is not None)
        inside = next((f for f in fences if f.body < cut < f.end), None)
        piece = text[position:cut]
        if inside is not None:
            parts.append(reopen + piece.rstrip("\n") + "\n```")
            reopen = f"```{inside.language}\n"
            position = cut
        else:
            parts.append((reopen + piece).rstrip())
            reopen = ""
            position = cut
            while position < len(text) and text[position] in " \t\n":
                position += 1
    return [part for part in parts if part.strip()]


# --- SMS encodings ------------------------------------------------------------------------------

# GSM 03.38: the basic set (one septet each) and the extension table (an escape and a septet: two).
_GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = set("^{}\\[~]|€\f")
# Smart encoding: typographic characters and their plain GSM-7 twins (escaped: they look alike).
_SMART = str.maketrans(
    {
        **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u00b4`", "'"),  # single quotes, prime, accents
        **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),  # double quotes, guillemets
        **dict.fromkeys("\u2013\u2014\u2015\u2010\u2011\u2212\u2022", "-"),  # dashes, minus, bullet
        **dict.fromkeys("\u00a0\u2009\u202f\t", " "),  # no-break and thin spaces, tab
        "\u2026": "...",  # ellipsis
        "\u200b": "",  # zero-width space
    }
)
GSM7, UCS2 = "GSM-7", "UCS-2"
# Septets (GSM-7) or UTF-16 code units (UCS-2) in one message, and in each part of a longer one (the
# rest of each part carries the header that joins them).
_SINGLE = {GSM7: 160, UCS2: 70}
_CONCATENATED = {GSM7: 153, UCS2: 67}


@dataclass(frozen=True)
class SmsPart:
    text: str
    encoding: str  # GSM-7 or UCS-2
    segments: int  # what the carrier bills for it


def smart_encode(text: str) -> str:
    """Typographic characters replaced by their plain GSM-7 twins."""
    return text.translate(_SMART)


def encoding_of(text: str) -> str:
    return GSM7 if all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in text) else UCS2


def _units(char: str, encoding: str) -> int:
    if encoding == GSM7:
        return 2 if char in _GSM_EXTENDED else 1
    return 2 if ord(char) > 0xFFFF else 1  # a surrogate pair in UTF-16


def segments(text: str, encoding: str | None = None) -> int:
    """The segments a carrier bills for `text`. A character is never split between two segments (an
    escaped GSM-7 character, a UTF-16 surrogate pair), which is why this can be one more than the
    length divided by the segment size."""
    encoding = encoding or encoding_of(text)
    units = [_units(c, encoding) for c in text]
    if sum(units) <= _SINGLE[encoding]:
        return 1
    size, count, used = _CONCATENATED[encoding], 1, 0
    for unit in units:
        if used + unit > size:
            count, used = count + 1, 0
        used += unit
    return count


def split_sms(text: str, *, smart: bool = False, limit: int = SMS_LIMIT) -> list[SmsPart]:
    """Parts of at most `limit` characters, each with its own encoding and segment count."""
    if smart:
        text = smart_encode(text)
    parts = []
    for part in split_text(text, limit):
        encoding = encoding_of(part)
        parts.append(SmsPart(part, encoding, segments(part, encoding)))
    return parts
