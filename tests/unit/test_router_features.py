"""Cheap features of a request."""

from __future__ import annotations

import math

import pytest

from services.router.classifier import features as feat
from services.router.classifier.types import Message, user_messages


def dense(text: str, **kw: int) -> dict[str, float]:
    f = feat.extract(user_messages(text), **kw)
    return dict(zip(feat.DENSE_FEATURES, f.dense.tolist(), strict=True))


def count(feature: float) -> int:
    """The count behind a log1p feature (log1p is computed, so its last bit may differ between math and numpy)."""
    return round(math.expm1(feature))


def test_vector_has_every_named_feature_and_every_feature_has_a_reason() -> None:
    f = feat.extract(user_messages("hello"))
    assert f.dense.shape == (feat.N_DENSE,)
    assert set(feat.REASONS) == set(feat.DENSE_FEATURES)


def test_length_features_grow_with_the_prompt() -> None:
    short, long = dense("Hi there."), dense("Hi there. " * 200)
    assert long["prompt_tokens"] > short["prompt_tokens"] > 0
    assert feat.estimate_tokens("word " * 100) >= 100
    assert feat.estimate_tokens("x" * 400) == 100  # no spaces: chars / 4


def test_code_cues() -> None:
    code = dense("Fix this Python function:\n```python\ndef f(x):\n    return x + 1\n```")
    prose = dense("Tell me about the history of Rome.")
    assert code["code_block"] > 0 and code["code_words"] > 0
    assert prose["code_block"] == 0 and prose["code_words"] == 0


def test_math_cues() -> None:
    m = dense("Solve the equation 3x + 5 = 20 and compute the probability that x > 4. It costs $12 or 15%.")
    assert m["math_expr"] > 0 and m["math_words"] > 0 and m["numbers"] > 0
    assert dense("Write a poem about autumn.")["math_expr"] == 0


def test_multi_step_and_reasoning_cues() -> None:
    m = dense("First she buys 3 apples, then gives half to Tom; after that each friend gets 2. Explain why.")
    assert m["multi_step"] > 0 and m["reasoning"] > 0


def test_constraints_and_requested_output_length() -> None:
    c = dense("Write a detailed essay in 500 words. You must use exactly three sections and do not use bullets.")
    assert count(c["constraints"]) >= 4
    assert c["long_output_cue"] > 0
    assert dense("Answer briefly: yes or no?")["short_output_cue"] > 0
    assert dense("hi", max_tokens=1000)["max_tokens"] == pytest.approx(math.log1p(1000))
    assert dense("hi")["max_tokens"] == 0


def test_multiple_choice_shape() -> None:
    q = "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. None of the above\nAnswer:"
    d = dense(q)
    assert d["choices"] == 4
    assert d["numeric_choices"] == 0.75
    assert d["catch_all_choice"] == 1.0
    assert dense("A. is not a list by itself")["choices"] == 0
    assert dense("Options:\nB. one\nC. two")["choices"] == 0  # must start at A
    assert dense("Vitamin A. helps, and so does C. in fruit")["choices"] == 0  # A then C: not a run


def test_collapsed_whitespace_gives_the_same_features() -> None:
    """The router classifies the cache's normalised text (whitespace collapsed): the features must not change."""
    raw = " In Ward-Leonard system, the lower limit of the speed is set by\nA. Field resistance.\nB. Armature.\n" + (
        "C. Residual magnetism of the generator.\nD. None of the above.\nAnswer:"
    )
    collapsed = " ".join(raw.split())
    assert dense(raw) == dense(collapsed)
    assert dense(raw)["choices"] == 4
    code = "def f(x):\n    return x + 1\n\nprint(f(2))"
    assert dense(code)["code_block"] == dense(" ".join(code.split()))["code_block"] > 0


def test_language_cues() -> None:
    assert dense("Привет, как дела? Расскажи мне о погоде.")["non_latin"] == 1.0
    assert dense("¿Dónde está la estación?")["non_latin"] == 0.0
    assert 0 < dense("¿Dónde está la estación?")["non_ascii"] < 0.5
    assert dense("这个问题怎么解决")["non_latin"] == 1.0


def test_conversation_turns_and_system_prompt() -> None:
    msgs = [
        Message("system", "You are a careful assistant. Always answer in JSON."),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "What is 2 + 2?"),
    ]
    f = feat.extract(msgs)
    d = dict(zip(feat.DENSE_FEATURES, f.dense.tolist(), strict=True))
    assert d["turns"] == pytest.approx(math.log1p(2))
    assert d["system_tokens"] > 0
    assert d["constraints"] > 0  # "Always answer in JSON" is in the system prompt
    assert f.token_estimate > feat.estimate_tokens("What is 2 + 2?")


def test_hashed_ngrams_are_deterministic_in_range_and_order_sensitive() -> None:
    a = feat.extract(user_messages("the cat sat on 12 mats"), hash_bits=10).hashed
    b = feat.extract(user_messages("the cat sat on 99 mats"), hash_bits=10).hashed
    c = feat.extract(user_messages("mats 12 on sat cat the"), hash_bits=10).hashed
    assert a.tolist() == b.tolist()  # numbers fold to their shape
    assert a.size == 6 + 5  # unigrams + bigrams
    assert a.min() >= 0 and a.max() < 1 << 10
    assert sorted(a[:6].tolist()) == sorted(c[:6].tolist())  # same unigrams
    assert a[6:].tolist() != c[6:].tolist()  # different bigrams
    assert feat.hash_ngrams([], 10).size == 0


def test_very_long_prompts_hash_a_bounded_number_of_tokens() -> None:
    f = feat.extract(user_messages("word " * 10_000), hash_bits=12, max_hashed_tokens=128)
    assert f.hashed.size == 128 + 127  # the window holds more than 128 tokens: head and tail of it
    assert f.token_estimate >= 10_000


def test_only_the_needed_features_are_computed_and_they_are_the_same() -> None:
    prompts = [
        "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. None of the above\nAnswer:",
        "First she buys 3 apples, then gives half to Tom; after that each friend gets 2. Explain why. 15% off $12.",
        "Write a detailed essay in 500 words. You must use exactly three sections.\n"
        "```python\ndef f(x):\n  return x\n```",
        "Привет, как дела? Which of these is NOT true? A. one B. two",
        "word " * 3000,
    ]
    need = frozenset({"math_words", "negation_cue", "quantitative", "code_block"})
    keep = need | feat.ALWAYS
    for p in prompts:
        full = dense(p)
        some = dict(zip(feat.DENSE_FEATURES, feat.extract(user_messages(p), need=need).dense.tolist(), strict=True))
        assert {k: v for k, v in some.items() if k in keep} == {k: full[k] for k in keep}
        assert some["list_items"] == some["capitalized"] == some["constraints"] == 0.0  # scans nothing reads: skipped


def test_saturating_quantity_cues() -> None:
    assert dense("no numbers here")["quantitative"] == 0.0
    assert dense("one 7 here")["quantitative"] == 0.5
    assert dense("7 and 8 and 9")["quantitative"] == 1.0
    assert dense("it costs $12 or 15% and 3 + 4")["arithmetic"] == 1.0
