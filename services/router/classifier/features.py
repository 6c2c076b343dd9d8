"""Cheap, deterministic features of a request: what the classifier sees.

Two kinds, computed with the standard library and numpy in a bounded number of passes over the text:

* **dense** features with names (length and token estimate, code, maths, multi-step and reasoning cues, requested
  output length, number of constraints, language, multiple-choice shape); they also explain a decision (the
  ``reasons`` of a route are the dense features that pushed the score up the most);
* **hashed n-grams** of the last user message (word unigrams and bigrams, numbers folded to their shape), hashed
  with CRC-32 into a fixed number of buckets so the model needs no vocabulary.

The text seen is the conversation as the model would see it: the length features count every message, the cue
features look at the system prompt and the user turns, the n-grams look at the last user turn (the request being
routed).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.router.classifier.types import Message

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

#: Characters of a message the cue features read: longer texts are read at their head and tail (half each), which
#: bounds the cost of a request; the length features still count all of it (extrapolated from the window). 1,000
#: keeps Router.decide under 2 ms CPU at p99 for prompts of 2,000 tokens on this shared machine; the protocols of
#: bench/router.py gave the same APGR with 1,000, 1,500 and 4,000 (the previous value).
WINDOW_CHARS = 1000
#: Characters at the end of the last user message searched for multiple-choice options (long options, as in law
#: questions, do not fit the cue window; every dev question's options fit in 3,000).
OPTIONS_CHARS = 3000
#: Bucket count (bits) of the hashed n-grams when a model uses them; the artifact records its own (0 = none).
DEFAULT_HASH_BITS = 18


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_TOKEN_RE = re.compile(r"[^\W\d_]+|\d+(?:[.,]\d+)*|[^\w\s]")
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END_RE = re.compile(r"[.!?](?:\s|$)")
_OPTION_MARK_RE = re.compile(r"(?<!\S)\(?([A-H])[.)](?=\s)")  # after whitespace or at the start
_ANSWER_CUE_RE = re.compile(r"\s*(?:Answer|Correct answer)\s*:?\s*$", re.IGNORECASE)
_LIST_ITEM_RE = re.compile(r"(?<!\S)(?:\d{1,2}[.)]|[-*•])(?=\s)")
_CODE_FENCE_RE = re.compile(r"```|~~~")
_CODE_SYNTAX_RE = re.compile(
    r"\b(?:def \w+\(|class \w+\s*[:({]|import \w+|from \w+ import\b|return\b|function\s*\w*\s*\(|"
    r"(?:const|let|var) \w+\s*=|(?:SELECT|INSERT|UPDATE) \w)"
)
_CODE_SYMBOLS = ("{", "}", ";", "=>", "==", "!=", "#include")
_LATEX_RE = re.compile(r"\\(?:frac|sqrt|int|sum|cdot|times|le|ge|pi|alpha|beta|theta|lambda)\b|\$[^$\n]+\$")
_MATH_EXPR_RE = re.compile(r"\d\s*[-+*/^=×÷<>≤≥]\s*[\d(a-z]|[a-z]\s*[\^=]\s*\d|\d\s*%|\$\s*\d")
_WORD_COUNT_RE = re.compile(r"\b\d+\s*(?:words?|sentences?|paragraphs?|bullet points?|items?|lines?|pages?)\b")
_NEGATION_CUE_RE = re.compile(r"\b(?:NOT|EXCEPT|LEAST|FALSE|INCORRECT)\b")
_STATEMENT_RE = re.compile(r"\b(?:Statement\s*\d|I and II|II and III|I, II|I only|II only|III only)\b")
_PHRASE_RE: dict[str, re.Pattern[str]] = {
    "multi_step": re.compile(
        r"\b(?:step by step|and then|after that|how many (?:more|less|fewer)|in total|altogether|the rest|"
        r"each of|per (?:day|week|month|year|hour)|at the end of|left over)\b"
    ),
    "constraint": re.compile(
        r"\b(?:must|must not|should not|do not|don't|never|only|exactly|at least|at most|no more than|"
        r"fewer than|within|without using|make sure|ensure|strictly|format|json|yaml|csv|markdown|table|"
        r"bullet|in the style of|keep it|limit)\b"
    ),
    "long_output": re.compile(
        r"\b(?:essay|article|blog post|story|report|detailed|in detail|comprehensive|in depth|elaborate|"
        r"step-by-step|full implementation|write a program|draft|compose|outline|plan)\b"
    ),
    "short_output": re.compile(
        r"\b(?:briefly|brief|short|concise|one word|one sentence|yes or no|true or false|just the answer|"
        r"answer:|tl;dr)"
    ),
}

_MATH_WORDS = _wordset(
    "calculate compute solve equation equations integral derivative probability percent percentage ratio "
    "average mean median sum product total remainder divisible prime factor fraction sqrt root roots "
    "polynomial matrix vector limit log logarithm exponent expected variance deviation interest rate "
    "speed velocity acceleration area volume perimeter radius diameter triangle angle degrees theorem "
    "proof prove formula function functions integer integers real number numbers value maximum minimum"
)
_CODE_WORDS = _wordset(
    "code program function python java javascript typescript c++ rust golang sql regex algorithm "
    "implement implementation compile compiler debug bug api class method variable array list string loop "
    "recursion recursive complexity runtime script html css json http database query"
)
_STEP_WORDS = _wordset(
    "then after before next each every per twice thrice half third quarter double triple remaining rest "
    "left more less fewer first second finally later until times"
)
_REASONING_WORDS = _wordset(
    "why explain prove justify reason reasoning analyze analyse analysis compare contrast evaluate infer "
    "inference imply implies implication conclude conclusion assume assumption hypothesis argument logic "
    "logical valid validity deduce derive evidence consequence cause effect paradox principle"
)
_SCENARIO_WORDS = _wordset(
    "suppose assume consider imagine scenario situation hypothetical case plaintiff defendant patient client "
    "company firm man woman person buyer seller owner tenant landlord employee employer"
)
_NON_ASCII_LETTER_RE = re.compile(r"(?:(?![\x00-\x7f])[^\W\d_])")
_NON_LATIN_LETTER_RE = re.compile(r"(?:(?![\x00-\u024f\u1e00-\u1eff])[^\W\d_])")
_CAPITALIZED_RE = re.compile(r"(?<=[^.!?:\s])\s+[A-Z]")
_CATCH_ALL_RE = re.compile(r"\b(?:all of the above|none of the above|both|neither|all of these|none of these)\b")

#: Names of the dense features, in vector order.
DENSE_FEATURES: tuple[str, ...] = (
    "prompt_tokens",  # log1p(token estimate of the whole conversation)
    "user_tokens",  # log1p(token estimate of the last user turn)
    "list_items",  # log1p(numbered or bulleted items)
    "sentences",  # log1p(sentences)
    "questions",  # log1p('?' count)
    "numbers",  # log1p(numbers in the text)
    "number_density",  # numbers / words
    "math_expr",  # log1p(arithmetic expressions, LaTeX, percentages, currency)
    "math_words",  # log1p(maths vocabulary)
    "code_block",  # code fences and code syntax (log1p)
    "code_words",  # log1p(programming vocabulary)
    "multi_step",  # log1p(multi-step cues: sequencing words and phrases)
    "reasoning",  # log1p(reasoning cues)
    "constraints",  # log1p(instructions that constrain the answer: must, only, format, N words, ...)
    "long_output_cue",  # asks for a long answer (essay, detailed, N words, ...)
    "short_output_cue",  # asks for a short answer (brief, one word, "Answer:")
    "max_tokens",  # log1p(requested max_tokens; 0 = not given)
    "choices",  # number of multiple-choice options (0 if none)
    "choice_tokens",  # log1p(mean tokens per option)
    "numeric_choices",  # share of options that are numbers or formulas
    "negation_cue",  # NOT / EXCEPT / LEAST questions, statement-combination questions
    "stem_tokens",  # log1p(tokens of the question without its options)
    "choice_spread",  # spread of option lengths (std / mean of their token counts)
    "catch_all_choice",  # an option is "all/none of the above", "both", "neither"
    "scenario",  # log1p(case / scenario vocabulary: suppose, plaintiff, patient, ...)
    "capitalized",  # share of capitalised words not starting a sentence (names, places, terms)
    "long_words",  # share of words with >= 10 letters (technical vocabulary)
    "non_ascii",  # share of non-ASCII letters
    "non_latin",  # 1 when most letters are outside the Latin script (language other than English et al.)
    "turns",  # log1p(number of prior turns)
    "system_tokens",  # log1p(token estimate of system prompts)
    "quantitative",  # numbers in the text, saturating: 0, 0.5 for one, 1 for two or more (a task with quantities)
    "arithmetic",  # arithmetic expressions, LaTeX, percentages, currency, saturating like ``quantitative``
)
N_DENSE = len(DENSE_FEATURES)

#: What a dense feature is called when it is a reason for routing up (related features share a reason).
REASONS: dict[str, str] = {
    "prompt_tokens": "long_prompt",
    "user_tokens": "long_prompt",
    "stem_tokens": "long_prompt",
    "list_items": "list_items",
    "sentences": "many_sentences",
    "questions": "several_questions",
    "numbers": "numbers",
    "number_density": "numbers",
    "math_expr": "math_cue",
    "math_words": "math_cue",
    "code_block": "code_block",
    "code_words": "code_cue",
    "multi_step": "multi_step",
    "reasoning": "reasoning_cue",
    "constraints": "constraints",
    "long_output_cue": "long_output",
    "short_output_cue": "short_output",
    "max_tokens": "long_output",
    "choices": "multiple_choice",
    "choice_tokens": "long_choices",
    "numeric_choices": "numeric_choices",
    "negation_cue": "negation_cue",
    "choice_spread": "uneven_choices",
    "catch_all_choice": "catch_all_choice",
    "scenario": "scenario",
    "capitalized": "named_entities",
    "long_words": "technical_vocabulary",
    "non_ascii": "non_english",
    "non_latin": "non_english",
    "turns": "multi_turn",
    "system_tokens": "long_system_prompt",
    "quantitative": "numbers",
    "arithmetic": "math_cue",
}
#: Features that are always computed, whatever a model needs: the gate (``choices``) and the length prior.
ALWAYS: frozenset[str] = frozenset({"choices", "prompt_tokens", "user_tokens"})
#: Counts at which the saturating features reach 1.
SATURATION = 2


@dataclass(frozen=True, slots=True)
class Features:
    """What the model consumes for one request."""

    dense: FloatArray  # shape (N_DENSE,)
    hashed: IntArray  # bucket indices of the n-grams (with repeats)
    token_estimate: int  # whole conversation, in tokens (heuristic)


def _window(text: str) -> str:
    """The part of a text the cue features read: all of it up to ``WINDOW_CHARS``, else its head and tail."""
    if len(text) <= WINDOW_CHARS:
        return text
    half = WINDOW_CHARS // 2
    return f"{text[:half]}\n{text[-half:]}"


def _token_count(text: str, pieces_in_window: int | None = None) -> int:
    window = _window(text)
    n = len(_TOKEN_RE.findall(window)) if pieces_in_window is None else pieces_in_window
    if window is not text:
        n = round(n * len(text) / len(window))  # extrapolated from the window
    return max(math.ceil(len(text) / 4), n)


def estimate_tokens(text: str) -> int:
    """Token estimate without a tokenizer: the larger of chars/4 and the count of word/number/symbol pieces
    (counted in the head and tail of very long texts and extrapolated, so the cost is bounded)."""
    return _token_count(text)


def _fold_token(tok: str) -> str:
    """Lower-case words; numbers folded to their shape (digit count, decimal) so '17' and '42' share a bucket."""
    c = tok[0]
    if c.isdigit():
        if "." in tok or "," in tok:
            return "<dec>"
        return f"<n{min(len(tok), 4)}>"
    return tok.lower()


def hash_ngrams(tokens: Sequence[str], bits: int) -> IntArray:
    """Bucket indices of word unigrams and bigrams (CRC-32 of each folded token, bigrams mixed in numpy)."""
    if not tokens:
        return np.zeros(0, dtype=np.int64)
    uni = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    mask = np.uint64((1 << bits) - 1)
    if uni.size > 1:
        bi = (uni[:-1] * np.uint64(0x9E3779B1) + uni[1:] * np.uint64(0x85EBCA77) + np.uint64(0x27D4EB2F)) >> np.uint64(
            7
        )
        out = np.concatenate((uni & mask, bi & mask))
    else:
        out = uni & mask
    result: IntArray = out.astype(np.int64)
    return result


def _script_shares(text: str, letters: int) -> tuple[float, float]:
    """(share of non-ASCII letters, 1.0 when most letters are outside the Latin script)."""
    if letters == 0 or text.isascii():
        return 0.0, 0.0
    non_ascii = len(_NON_ASCII_LETTER_RE.findall(text))
    non_latin = len(_NON_LATIN_LETTER_RE.findall(text))
    return min(non_ascii / letters, 1.0), 1.0 if non_latin * 2 > letters else 0.0


def _options(text: str) -> list[str]:
    """The options of a multiple-choice question: the last run of markers 'A.' 'B.' 'C.' ... (or 'A)', '(A)') in
    order, each option running to the next marker. Line breaks are not needed, so collapsed whitespace (the cache's
    normalised text, which is what the router classifies) parses the same."""
    # A run starts at an "A" mark: scan from the first "A." / "A)" (most texts have none, and are not scanned).
    starts = [i for i in (text.find("A."), text.find("A)")) if i >= 0]
    if not starts:
        return []
    marks = list(_OPTION_MARK_RE.finditer(text, max(min(starts) - 1, 0)))
    best: list[re.Match[str]] = []
    run: list[re.Match[str]] = []
    for m in marks:
        label = m.group(1)
        if label == "A":
            run = [m]
        elif run and ord(label) == ord(run[-1].group(1)) + 1:
            run.append(m)
        else:
            continue
        if len(run) >= 2 and len(run) >= len(best):
            best = list(run)
    if len(best) < 2:
        return []
    bounds = [m.end() for m in best]
    starts = [m.start() for m in best[1:]] + [len(text)]
    options = [text[a:b].strip() for a, b in zip(bounds, starts, strict=True)]
    last = options[-1]
    cue = _ANSWER_CUE_RE.search(last, max(0, len(last) - 40))
    if cue is not None:
        options[-1] = last[: cue.start()]
    return options


def _solid_chars(text: str) -> int:
    """Characters that are not blanks (spaces, tabs, line breaks)."""
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t") - text.count("\r")


def _is_numeric_option(option: str) -> bool:
    """Mostly digits and symbols, judged on its first 64 characters (a number or formula is short; on dev this
    differs from judging the whole option for 2 options of 30,616)."""
    stripped = option[:64].strip()
    if not stripped:
        return False
    digits = sum(map(str.isdigit, stripped))
    not_letters = len(stripped) - sum(map(str.isalpha, stripped))
    return digits > 0 and digits + not_letters >= 0.6 * len(stripped)


def _build_lexicon() -> dict[str, int]:
    lexicon: dict[str, int] = {}
    for bit, words in enumerate((_SCENARIO_WORDS, _MATH_WORDS, _CODE_WORDS, _STEP_WORDS, _REASONING_WORDS)):
        for w in words:
            lexicon[w] = lexicon.get(w, 0) | (1 << bit)
    return lexicon


_LEXICON = _build_lexicon()
_SCENARIO, _MATH, _CODE, _STEP, _REASONING = 1, 2, 4, 8, 16


def extract(
    messages: Sequence[Message],
    *,
    max_tokens: int = 0,
    hash_bits: int = 0,
    max_hashed_tokens: int = 2048,
    need: frozenset[str] | None = None,
) -> Features:
    """Features of one request. ``max_tokens`` is the caller's output cap (0 = not given); ``hash_bits`` > 0 also
    hashes the word n-grams of the last user turn into ``2**hash_bits`` buckets. ``need``: the dense features to
    compute (plus :data:`ALWAYS`); the others are left at 0 (a model passes the features it weighs, which skips the
    scans nothing reads). ``None``: all of them.

    Cue features read at most ``WINDOW_CHARS`` of a message (head and tail of longer ones) and at most
    ``max_hashed_tokens`` tokens are hashed, so the cost of a request is bounded whatever its size.
    """
    want = (lambda _name: True) if need is None else (need | ALWAYS).__contains__
    user = ""
    system_parts: list[str] = []
    other_tokens = 0
    turns = 0
    last_user = -1
    for i, m in enumerate(messages):
        if m.role == "user":
            last_user = i
    for i, m in enumerate(messages):
        if i == last_user:
            user = m.content
        else:
            other_tokens += estimate_tokens(m.content)
            if m.role == "system":
                system_parts.append(m.content)
        if m.role != "system":
            turns += 1
    turns = max(turns - 1, 0)
    system = "\n".join(system_parts)

    uw = _window(user)
    sw = _window(system) if system else ""
    raw_tokens = _TOKEN_RE.findall(uw)
    user_tokens = _token_count(user, len(raw_tokens))
    total_tokens = user_tokens + other_tokens
    system_tokens = estimate_tokens(system) if system else 0
    instructions = f"{sw}\n{uw}" if system else uw
    words = [t.lower() for t in raw_tokens if t[0].isalpha()]
    n_words = max(len(words), 1)
    n_numbers = len(_NUMBER_RE.findall(uw))  # the number pieces of _TOKEN_RE: the same matches

    math_words = code_words = step_words = reasoning_words = long_words = scenario_words = letters = 0
    if want("long_words") or want("non_ascii") or want("non_latin"):
        letters = sum(map(len, words))
        long_words = sum(1 for w in words if len(w) >= 10)
    if any(want(f) for f in ("math_words", "code_words", "multi_step", "reasoning", "scenario")):
        for bits in [b for b in map(_LEXICON.get, words) if b]:
            if bits & _SCENARIO:
                scenario_words += 1
            if bits & _MATH:
                math_words += 1
            if bits & _CODE:
                code_words += 1
            if bits & _STEP:
                step_words += 1
            if bits & _REASONING:
                reasoning_words += 1
        if system:
            code_words += sum(1 for w in _TOKEN_RE.findall(sw.lower()) if w in _CODE_WORDS)

    options = _options(user[-OPTIONS_CHARS:])  # the options end a question: read its tail
    choice_tokens = choice_spread = numeric_choices = catch_all = 0.0
    stem_tokens = user_tokens
    if options:
        # Tokens of an option: its share of the message's non-blank characters times the message's tokens
        # (tokenising each option again cost as much as the rest of the options scan; blanks are not counted so
        # that collapsed whitespace gives the same share).
        per_char = user_tokens / max(_solid_chars(user), 1)
        option_tokens = [_solid_chars(o) * per_char for o in options]
        choice_tokens = sum(option_tokens) / len(options)
        if want("choice_spread"):
            choice_spread = float(np.std(option_tokens)) / max(choice_tokens, 1.0)
        numeric_choices = sum(_is_numeric_option(o) for o in options) / len(options)
        if want("catch_all_choice"):
            catch_all = 1.0 if any(_CATCH_ALL_RE.search(o.lower()) for o in options) else 0.0
        stem_tokens = max(round(user_tokens - sum(option_tokens)), 0)

    lower = (
        instructions.lower()
        if any(
            want(f)
            for f in ("constraints", "long_output_cue", "short_output_cue", "math_expr", "arithmetic", "multi_step")
        )
        else ""
    )
    word_counts = len(_WORD_COUNT_RE.findall(lower)) if want("constraints") or want("long_output_cue") else 0
    code_block = (
        3 * len(_CODE_FENCE_RE.findall(instructions))
        + len(_CODE_SYNTAX_RE.findall(instructions))
        + sum(instructions.count(sym) for sym in _CODE_SYMBOLS)
        if want("code_block")
        else 0
    )
    math_expr = (
        len(_MATH_EXPR_RE.findall(lower)) + 2 * len(_LATEX_RE.findall(instructions))
        if want("math_expr") or want("arithmetic")
        else 0
    )
    constraints = len(_PHRASE_RE["constraint"].findall(lower)) + word_counts if want("constraints") else 0
    multi_step = step_words + 2 * len(_PHRASE_RE["multi_step"].findall(lower)) if want("multi_step") else 0
    long_out = len(_PHRASE_RE["long_output"].findall(lower)) + word_counts if want("long_output_cue") else 0
    short_out = len(_PHRASE_RE["short_output"].findall(lower)) if want("short_output_cue") else 0
    negation = len(_NEGATION_CUE_RE.findall(uw)) + len(_STATEMENT_RE.findall(uw)) if want("negation_cue") else 0
    capitalized = len(_CAPITALIZED_RE.findall(uw)) if want("capitalized") else 0
    non_ascii, non_latin = _script_shares(uw, letters) if want("non_ascii") or want("non_latin") else (0.0, 0.0)
    list_items = len(_LIST_ITEM_RE.findall(uw)) if want("list_items") else 0
    sentences = len(_SENTENCE_END_RE.findall(uw)) if want("sentences") else 0
    log1p = math.log1p

    dense = np.array(
        [
            log1p(total_tokens),
            log1p(user_tokens),
            log1p(list_items),
            log1p(sentences),
            log1p(uw.count("?")),
            log1p(n_numbers),
            n_numbers / n_words,
            log1p(math_expr),
            log1p(math_words),
            log1p(code_block),
            log1p(code_words),
            log1p(multi_step),
            log1p(reasoning_words),
            log1p(constraints),
            log1p(long_out),
            log1p(short_out),
            log1p(max(max_tokens, 0)),
            float(len(options)),
            log1p(choice_tokens),
            numeric_choices,
            log1p(negation),
            log1p(stem_tokens),
            choice_spread,
            catch_all,
            log1p(scenario_words),
            capitalized / n_words,
            long_words / n_words,
            non_ascii,
            non_latin,
            log1p(turns),
            log1p(system_tokens),
            min(n_numbers, SATURATION) / SATURATION,
            min(math_expr, SATURATION) / SATURATION,
        ],
        dtype=np.float64,
    )

    if hash_bits <= 0:
        return Features(dense=dense, hashed=np.zeros(0, dtype=np.int64), token_estimate=total_tokens)
    if len(raw_tokens) > max_hashed_tokens:
        half = max_hashed_tokens // 2
        raw_tokens = raw_tokens[:half] + raw_tokens[-half:]
    folded = [_fold_token(t) for t in raw_tokens]
    return Features(dense=dense, hashed=hash_ngrams(folded, hash_bits), token_estimate=total_tokens)
