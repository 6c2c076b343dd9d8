"""Normalization tables: realistic prompt pairs that must share a key, and pairs that must not."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.cache import normalizer as normalizer_module
from services.cache.keys import Message, Role, Sampling, build_key
from services.cache.normalizer import Normalizer, NormalizerConfig

GREEDY = Sampling(max_tokens=256, temperature=0.0)
SYSTEM = "You are a support assistant for Acme Cloud. Answer briefly."


def key(text: str, *, config: NormalizerConfig | None = None, system: str = SYSTEM) -> str:
    return build_key(
        namespace="acme",
        model="cheap",
        sampling=GREEDY,
        messages=[Message(Role.SYSTEM, system), Message(Role.USER, text)],
        normalizer=Normalizer(config),
    )


# (id, a, b): the same question, written or stamped differently.
MUST_HIT = [
    (
        "re-spaced",
        "Summarize this support ticket:\n\nCustomer says the app crashes on login since the last update.",
        "Summarize this support ticket:  Customer says the app  crashes on login since the last update.  ",
    ),
    ("tabs-and-crlf", "Line one\r\nLine two\tand three", "Line one\nLine two and three"),
    (
        "iso-timestamp",
        "Current time: 2024-05-01T12:03:11Z. How do I rotate my API key?",
        "Current time: 2024-06-17T08:45:59.120+02:00. How do I rotate my API key?",
    ),
    (
        "log-line-timestamp",
        "Explain this error: [2024-05-01 12:03:11,123] ERROR db pool exhausted",
        "Explain this error: [2024-05-02 07:00:00,999] ERROR db pool exhausted",
    ),
    (
        "http-date",
        "Date: Wed, 01 May 2024 12:03:11 GMT\nWhy was my request rejected with 429?",
        "Date: Thu, 02 May 2024 09:00:00 GMT\nWhy was my request rejected with 429?",
    ),
    (
        "us-datetime",
        "Ticket opened 05/01/2024 2:03 PM: cannot reset password",
        "Ticket opened 11/23/2024 9:41 AM: cannot reset password",
    ),
    (
        "request-uuid",
        "request_id=3f2a9c1e-4b7d-4e8a-9f1c-2d3e4f5a6b7c\nTranslate 'thank you' into German.",
        "request_id=8D1B2C3A-0F9E-4A7B-8C6D-5E4F3A2B1C0D\nTranslate 'thank you' into German.",
    ),
    (
        "trace-id-hex",
        "trace 4bf92f3577b34da6a3ce929d0e0e4736: what does status DEADLINE_EXCEEDED mean?",
        "trace 00f067aa0ba902b7a3ce929d0e0e9999: what does status DEADLINE_EXCEEDED mean?",
    ),
    ("epoch-seconds", "sent_at=1714564991 Classify: 'refund please'", "sent_at=1718612345 Classify: 'refund please'"),
    ("epoch-millis", "ts 1714564991123 Classify: 'refund please'", "ts 1718612345000 Classify: 'refund please'"),
    (
        "typographic-quotes",
        "What\u2019s the difference between \u201caffect\u201d and \u201ceffect\u201d?",
        'What\'s the difference between "affect" and "effect"?',
    ),
    ("dashes", "List pros \u2013 and cons \u2014 of Postgres", "List pros - and cons - of Postgres"),
    ("nfkc-fullwidth", "\uff21\uff30\uff29 rate limits for the \ufb01rst tier", "API rate limits for the first tier"),
    ("nbsp", "Reset\u00a0my\u00a0password", "Reset my password"),
]

# (id, a, b): different questions that merely look alike.
MUST_NOT_HIT = [
    ("number", "Convert 100 USD to EUR", "Convert 1000 USD to EUR"),
    ("percentage", "What is 15% of 80?", "What is 15% of 90?"),
    ("negation", "Is it safe to take ibuprofen with alcohol?", "Is it not safe to take ibuprofen with alcohol?"),
    ("contraction-negation", "Should I restart the server now?", "Shouldn't I restart the server now?"),
    (
        "name",
        "Write a short birthday note for Alice from the team.",
        "Write a short birthday note for Alicia from the team.",
    ),
    ("possessive-name", "Summarize John's review of the Q3 plan.", "Summarize Joan's review of the Q3 plan."),
    ("case-carries-meaning", "Translate 'Polish' into German.", "Translate 'polish' into German."),
    ("bare-date-is-the-question", "What happened on 1969-07-20?", "What happened on 1969-07-21?"),
    ("time-of-day-alone", "Convert 3:45 pm to 24-hour time", "Convert 4:45 pm to 24-hour time"),
    ("version", "How do I upgrade from Python 3.11 to 3.12?", "How do I upgrade from Python 3.10 to 3.12?"),
    ("short-sha", "What changed in commit 3f2a9c1?", "What changed in commit 3f2a9c2?"),
    ("decimal-not-epoch", "Is 0.1714564991 larger than 0.2?", "Is 0.1714564992 larger than 0.2?"),
    ("long-digit-id", "Status of order 1234567890123456?", "Status of order 1234567890123457?"),
    ("eleven-digit-number", "Is 17145649911 prime?", "Is 17145649912 prime?"),
    ("punctuation", "Let's eat, grandma.", "Let's eat grandma."),
    ("uuid-vs-timestamp", "Look up id 3f2a9c1e-4b7d-4e8a-9f1c-2d3e4f5a6b7c", "Look up id 2024-05-01T12:00:00Z"),
    ("empty-vs-space-only-diff", "a b", "ab"),
]


@pytest.mark.parametrize(("a", "b"), [(a, b) for _, a, b in MUST_HIT], ids=[i for i, _, _ in MUST_HIT])
def test_same_question_shares_a_key(a: str, b: str) -> None:
    assert key(a) == key(b)


@pytest.mark.parametrize(("a", "b"), [(a, b) for _, a, b in MUST_NOT_HIT], ids=[i for i, _, _ in MUST_NOT_HIT])
def test_different_questions_never_share_a_key(a: str, b: str) -> None:
    assert key(a) != key(b)


CODE_A = "Fix this:\nif ready:\n    start()\nstop()"
CODE_B = "Fix this:\nif ready:\n    start()\n    stop()"

# (id, config, a, b, same): namespace-specific rules.
CONFIGURED = [
    (
        "casefold-on",
        NormalizerConfig(casefold=True),
        "What is the capital of France?",
        "what is the CAPITAL of france?",
        True,
    ),
    ("casefold-off", NormalizerConfig(), "What is the capital of France?", "what is the CAPITAL of france?", False),
    (
        "dates-on",
        NormalizerConfig(scrub_dates=True),
        "Daily report for 2024-05-01:",
        "Daily report for 2024-05-02:",
        True,
    ),
    ("dates-on-long", NormalizerConfig(scrub_dates=True), "Agenda for May 1, 2024", "Agenda for June 3, 2025", True),
    (
        "uuids-off",
        NormalizerConfig(scrub_uuids=False),
        "id 3f2a9c1e-4b7d-4e8a-9f1c-2d3e4f5a6b7c",
        "id 8d1b2c3a-0f9e-4a7b-8c6d-5e4f3a2b1c0d",
        False,
    ),
    (
        "timestamps-off",
        NormalizerConfig(scrub_timestamps=False),
        "at 2024-05-01T12:03:11Z",
        "at 2024-05-01T12:03:12Z",
        False,
    ),
    (
        "custom-pattern",
        NormalizerConfig(patterns={"ticket": r"TCK-\d+"}),
        "Summarize TCK-12345 for the on-call",
        "Summarize TCK-99881 for the on-call",
        True,
    ),
    (
        "custom-pattern-only-its-matches",
        NormalizerConfig(patterns={"ticket": r"TCK-\d+"}),
        "Summarize TCK-1 for Alice",
        "Summarize TCK-1 for Bob",
        False,
    ),
    ("lines-keeps-indentation", NormalizerConfig(whitespace="lines"), CODE_A, CODE_B, False),
    ("lines-collapses-inline", NormalizerConfig(whitespace="lines"), "x =  1   \n\n\n\ny = 2", "x = 1\n\ny = 2", True),
    ("collapse-loses-indentation", NormalizerConfig(), CODE_A.replace("    ", ""), CODE_A, True),
    ("whitespace-off", NormalizerConfig(whitespace="off"), "a  b", "a b", False),
    ("typography-off", NormalizerConfig(fold_typography=False), "it\u2019s", "it's", False),
]


@pytest.mark.parametrize(("config", "a", "b", "same"), [c[1:] for c in CONFIGURED], ids=[c[0] for c in CONFIGURED])
def test_namespace_rules(config: NormalizerConfig, a: str, b: str, same: bool) -> None:
    assert (key(a, config=config) == key(b, config=config)) is same


def test_volatile_fields_in_the_system_prompt_are_scrubbed_too() -> None:
    a = key("How do I export my data?", system=f"{SYSTEM} Now: 2024-05-01T12:03:11Z, session 7f3e9a0b1c2d3e4f5a6b")
    b = key("How do I export my data?", system=f"{SYSTEM} Now: 2024-05-09T00:00:00Z, session 0a1b2c3d4e5f6a7b8c9d")
    assert a == b


def test_placeholders_are_visible_in_the_normalized_text() -> None:
    text = "at 2024-05-01T12:03:11Z id 3f2a9c1e-4b7d-4e8a-9f1c-2d3e4f5a6b7c t=1714564991 h=4bf92f3577b34da6a3ce92"
    assert Normalizer().normalize(text) == "at <ts> id <uuid> t=<epoch> h=<hex>"


def test_changing_any_rule_changes_every_key() -> None:
    text = "plain text without anything to scrub"
    assert key(text) != key(text, config=NormalizerConfig(scrub_dates=True))
    assert key(text) != key(text, config=NormalizerConfig(patterns={"x": "zzz"}))


def test_a_new_normalizer_version_never_serves_old_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    before = key("What is our refund policy?")
    monkeypatch.setattr(normalizer_module, "NORMALIZER_VERSION", normalizer_module.NORMALIZER_VERSION + 1)
    assert key("What is our refund policy?") != before


@pytest.mark.parametrize(
    ("patterns", "message"),
    [({"Bad Name": "x"}, "must match"), ({"ok": "("}, "not a valid regular expression"), ({"ok": "x*"}, "empty")],
)
def test_bad_patterns_are_rejected_at_configuration(patterns: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormalizerConfig(patterns=patterns)


ALL_SCRUBBERS = NormalizerConfig(scrub_dates=True)

RAW = NormalizerConfig(
    nfkc=False,
    fold_typography=False,
    whitespace="off",
    scrub_timestamps=False,
    scrub_uuids=False,
    scrub_epochs=False,
    scrub_hex_ids=False,
)


@pytest.mark.parametrize(("a", "b"), [(a, b) for _, a, b in MUST_HIT], ids=[i for i, _, _ in MUST_HIT])
def test_every_must_hit_pair_would_miss_on_a_raw_key(a: str, b: str) -> None:
    """The table is meaningful: without normalization each pair is a miss."""
    assert key(a, config=RAW) != key(b, config=RAW)


_WORDS = [
    "Current", "time", "at", "on", "May", "Wed", "Wednesday", "June", "Sept", "PM", "a.m.", "UTC", "GMT", "Z", "T",
    "+02:00", "-0500", "id", "0x", "deadbeef", "cafe", "Face", "Order", "v1.2.3", "3.14", "-", "é", "ß", "\u00a0",
]  # fmt: skip
_DATETIMES = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2033, 1, 1))
_FORMATS = ["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d %H:%M:%S", "%a, %d %b %Y %H:%M:%S GMT", "%B %d, %Y at %I:%M %p", "%m/%d/%Y",
            "%Y%m%dT%H%M%SZ", "%d %b %Y", "%H:%M", "%Y-%m-%d"]  # fmt: skip
_FRAGMENTS = st.one_of(
    st.sampled_from(_WORDS),
    st.integers(min_value=0, max_value=10**14).map(str),
    st.text(alphabet="0123456789-:/.,TZ ", min_size=1, max_size=14),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=40).filter(
        lambda h: len(h) < 16 or any(c.isdigit() for c in h[:24])
    ),
    st.uuids().map(str),
    st.tuples(_DATETIMES, st.sampled_from(_FORMATS)).map(lambda p: p[0].strftime(p[1])),
    st.integers(min_value=1_000_000_000, max_value=1_999_999_999_999).map(str),
)
_SEPARATORS = st.sampled_from([" ", " ", ", ", "\n", "=", ": ", "/", "(", ")", ".", "_", "-", "\t"])


@given(st.lists(st.tuples(_FRAGMENTS, _SEPARATORS), max_size=12), st.sampled_from([NormalizerConfig(), ALL_SCRUBBERS]))
@settings(max_examples=400, deadline=None)
def test_fast_scrubbing_equals_the_plain_regex(parts: list[tuple[str, str]], config: NormalizerConfig) -> None:
    text = "".join(f + s for f, s in parts)
    normalizer = Normalizer(config)
    assert normalizer._apply_builtin(text) == normalizer._apply_builtin_reference(text)


def test_memo_returns_what_the_rules_compute() -> None:
    normalizer = Normalizer()
    text = "  Current time: 2024-05-01T12:03:11Z  "
    assert (
        normalizer.normalize(text) == normalizer.normalize(text) == normalizer._normalize(text) == "Current time: <ts>"
    )
