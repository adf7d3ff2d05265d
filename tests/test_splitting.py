"""Splitting a text to each channel's rules (tasks/channels/splitting.py): Discord's 2,000 characters
at the best boundaries without breaking code, links or emphasis; SMS parts with their encoding and
the segments a carrier bills."""

import random
import re

import pytest

from tasks.channels.splitting import (
    DISCORD_LIMIT,
    GSM7,
    UCS2,
    segments,
    smart_encode,
    split_discord,
    split_sms,
    split_text,
)

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."  # 70 characters


def paragraph(sentences: int) -> str:
    return " ".join([SENTENCE] * sentences)


def squashed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def without_fence_lines(text: str) -> str:
    return squashed("\n".join(line for line in text.split("\n") if not line.lstrip().startswith("```")))


def fences_balanced(part: str) -> bool:
    return len(re.findall(r"^```", part, re.MULTILINE)) % 2 == 0


def test_a_short_text_is_one_part_and_an_empty_one_none() -> None:
    assert split_discord("hello") == ["hello"]
    assert split_discord("  \n ") == []


def test_a_long_text_is_cut_at_paragraphs_in_order_within_the_limit() -> None:
    paragraphs = [paragraph(10) for _ in range(6)]  # 6 x ~710 characters: 4,300 in all
    text = "\n\n".join(paragraphs)

    parts = split_discord(text)

    assert len(parts) == 3
    assert all(len(part) <= DISCORD_LIMIT for part in parts)
    assert parts == ["\n\n".join(paragraphs[0:2]), "\n\n".join(paragraphs[2:4]), "\n\n".join(paragraphs[4:6])]


def test_a_paragraph_longer_than_a_part_is_cut_after_a_sentence() -> None:
    text = paragraph(60)  # 4,259 characters, one paragraph

    parts = split_discord(text)

    assert all(len(part) <= DISCORD_LIMIT for part in parts)
    assert all(part.endswith("today.") for part in parts)
    assert squashed("".join(parts)) == squashed(text)


def test_a_word_longer_than_a_part_is_cut_where_it_must_be() -> None:
    text = "x" * 4500

    parts = split_discord(text)

    assert [len(part) for part in parts] == [2000, 2000, 500]
    assert "".join(parts) == text


def test_a_long_code_block_is_closed_and_opened_again_with_its_language() -> None:
    code = "\n".join(f"print('line {i}', {'x' * 40!r})" for i in range(150))  # ~9,000 characters
    text = f"Here is the script:\n\n```python\n{code}\n```\n\nRun it with python."

    parts = split_discord(text)

    assert len(parts) >= 5
    assert all(len(part) <= DISCORD_LIMIT for part in parts)
    assert all(fences_balanced(part) for part in parts)
    assert all(part.startswith("```python\n") for part in parts[1:-1])
    bodies = [re.search(r"```python\n(.*?)\n```", part, re.DOTALL).group(1) for part in parts if "```python" in part]
    assert "\n".join(bodies) == code  # every line once, in order, none cut in the middle
    assert parts[-1].endswith("Run it with python.")


def test_links_and_emphasis_are_never_cut() -> None:
    url = "https://example.com/a/very/long/path/" + "segment/" * 20  # ~200 characters
    pieces = [f"see [the docs]({url}) and **a bold phrase that must stay whole** then {url} then ||a spoiler||"]
    text = " ".join(pieces * 30)

    parts = split_discord(text)

    assert len(parts) > 2
    assert all(len(part) <= DISCORD_LIMIT for part in parts)
    for part in parts:
        assert part.count("**") % 2 == 0
        assert part.count("||") % 2 == 0
        assert part.count(f"[the docs]({url})") == part.count("[the docs]")
    assert sum(part.count(url) for part in parts) == 60


@pytest.mark.parametrize("seed", range(20))
def test_any_text_splits_into_parts_within_the_limit_with_fences_balanced(seed: int) -> None:
    rng = random.Random(seed)
    blocks = []
    for _ in range(rng.randint(5, 40)):
        choice = rng.random()
        if choice < 0.25:
            lines = [("y" * rng.randint(0, 120)) for _ in range(rng.randint(1, 60))]
            blocks.append("```" + rng.choice(["", "js", "python"]) + "\n" + "\n".join(lines) + "\n```")
        elif choice < 0.5:
            blocks.append(" ".join(rng.choice(["word", "**bold text**", "`code`", "https://e.com/" + "p" * 50])
                                   for _ in range(rng.randint(1, 300))))  # fmt: skip
        else:
            blocks.append("z" * rng.randint(1, 3000))
    text = "\n\n".join(blocks)

    parts = split_discord(text)

    assert parts
    assert all(0 < len(part) <= DISCORD_LIMIT for part in parts)
    assert all(fences_balanced(part) for part in parts)
    assert without_fence_lines("\n".join(parts)) == without_fence_lines(text)  # nothing lost, nothing added


def test_plain_text_for_sms_is_cut_at_the_same_boundaries() -> None:
    text = "\n".join([paragraph(5)] * 10)  # ten lines of ~350 characters

    parts = split_text(text, 1600)

    assert [len(part) for part in parts] == [len("\n".join([paragraph(5)] * 4))] * 2 + [
        len("\n".join([paragraph(5)] * 2))
    ]


# --- SMS encodings and segments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoding", "count"),
    [
        ("a" * 160, GSM7, 1),
        ("a" * 161, GSM7, 2),  # 153 septets in each part of a longer message
        ("a" * 306, GSM7, 2),
        ("a" * 307, GSM7, 3),
        ("€" * 80, GSM7, 1),  # an escaped character counts two septets
        ("€" * 81, GSM7, 2),
        ("a" * 152 + "€" + "a" * 10, GSM7, 2),  # the escape and its character stay in one segment
        ("a" * 152 + "€" + "a" * 152, GSM7, 3),
        ("é" * 70, GSM7, 1),  # é is in the basic set
        ("ж" * 70, UCS2, 1),
        ("ж" * 71, UCS2, 2),
        ("ж" * 66 + "😀" + "ж" * 67, UCS2, 3),  # a surrogate pair never straddles two segments
    ],
)
def test_the_encoding_and_segments_are_what_a_carrier_bills(text: str, encoding: str, count: int) -> None:
    (part,) = split_sms(text)

    assert (part.encoding, part.segments) == (encoding, count)
    assert segments(text) == count


def test_smart_encoding_keeps_one_typographic_quote_from_doubling_the_cost() -> None:
    text = "Don\u2019t forget \u201cthe meeting\u201d \u2013 tomorrow\u2026 " + "a" * 90

    (plain,) = split_sms(text)
    (smart,) = split_sms(text, smart=True)

    assert (plain.encoding, plain.segments) == (UCS2, 2)
    assert (smart.encoding, smart.segments) == (GSM7, 1)
    assert smart.text.startswith('Don\'t forget "the meeting" - tomorrow... ')
    assert smart_encode("\u00a0\u200b") == " "


def test_each_sms_part_has_its_own_encoding() -> None:
    text = "\n".join(["a" * 900, "emoji \U0001f600 " + "c" * 890, "d" * 900])

    parts = split_sms(text)

    assert [part.encoding for part in parts] == [GSM7, UCS2, GSM7]
    assert all(len(part.text) <= 1600 for part in parts)
    assert [part.segments for part in parts] == [segments(part.text) for part in parts]
