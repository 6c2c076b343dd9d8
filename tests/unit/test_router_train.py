"""The trainer's design: monotone cue weights, cues only, and the shrinkage toward the length prior."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.router.classifier import features as feat
from services.router.classifier.data import Record
from services.router.classifier.model import GATE_CHOICE, GATE_OPEN
from services.router.classifier.train import (
    DEFAULT_CUES,
    PREVIOUS,
    PRIOR_FEATURE,
    TrainConfig,
    featurize,
    score_featurized,
    train,
)
from services.router.classifier.types import user_messages


def records(open_rows: int = 150, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    out: list[Record] = []
    for _ in range(open_rows):
        steps = rng.randint(1, 8)
        text = " ".join(f"Then she buys {rng.randint(2, 90)} more apples." for _ in range(steps))
        out.append(
            Record(
                prompt=f"{text} How many now?",
                source="gsm8k",
                cheap_correct=rng.random() > steps / 9,
                full_correct=True,
            )
        )
    for i in range(200):
        hard = i % 3 == 0
        opts = " ".join(f"{c}. {rng.randint(1, 99) if hard else 'a word'}" for c in "ABCD")
        stem = "Which of these is NOT right about the plaintiff? " * (3 if hard else 1)
        out.append(
            Record(
                prompt=f"{stem}{opts} Answer:",
                source=f"mmlu/s{i % 4}",
                cheap_correct=not hard or rng.random() < 0.3,
                full_correct=rng.random() < 0.9,
            )
        )
    return out


def test_default_model_weighs_only_cues_and_never_lowers_a_score() -> None:
    model = train(records())
    allowed = set(DEFAULT_CUES) | {PRIOR_FEATURE}
    for head in model.heads.values():
        assert (head.weights >= 0).all()
        assert {feat.DENSE_FEATURES[i] for i in np.flatnonzero(head.weights)} <= allowed
    assert model.needed_features <= allowed
    assert model.meta["length_prior"]["heads"][GATE_CHOICE]["model_share"] == pytest.approx(200 / 1200)


def test_a_shape_with_too_few_prompts_is_ranked_by_length_alone() -> None:
    recs = records(open_rows=40)
    model = train(recs, TrainConfig(min_rows=100))
    head = model.heads[GATE_OPEN]
    assert np.flatnonzero(head.weights).tolist() == [feat.DENSE_FEATURES.index(PRIOR_FEATURE)]
    assert model.meta["length_prior"]["heads"][GATE_OPEN]["model_share"] == 0.0
    data = featurize(recs)
    scores = score_featurized(model, data)
    open_rows = np.where(data.gates == GATE_OPEN)[0]
    lengths = [feat.estimate_tokens(recs[i].prompt) for i in open_rows]
    order = np.argsort(lengths, kind="stable")
    assert np.all(np.diff(scores[open_rows][order]) >= 0)


def test_an_overwhelming_prior_is_length_only_and_no_prior_keeps_the_cues() -> None:
    recs = records()
    data = featurize(recs)
    length_like = train(recs, TrainConfig(prior_rows=1e12))
    prior = feat.DENSE_FEATURES.index(PRIOR_FEATURE)
    for head in length_like.heads.values():
        assert head.weights[prior] > 0
        assert np.flatnonzero(head.weights > 1e-6 * head.weights[prior]).tolist() == [prior]
    free = train(recs, TrainConfig(prior_rows=0, min_rows=0))
    assert "length_prior" not in free.meta
    assert np.count_nonzero(free.heads[GATE_CHOICE].weights) > 1
    assert score_featurized(free, data).std() > 0


def test_scores_are_probabilities_and_the_model_matches_its_vectorised_scores() -> None:
    recs = records()
    model = train(recs)
    data = featurize(recs)
    fast = score_featurized(model, data)
    assert ((fast > 0) & (fast < 1)).all()
    for i in (0, 7, 160, 201, 349):
        assert model.score(user_messages(recs[i].prompt)).score == pytest.approx(fast[i], abs=1e-12)


def test_previous_design_and_bad_configs() -> None:
    model = train(records(), PREVIOUS)
    assert "length_prior" not in model.meta
    assert any((h.weights < 0).any() for h in model.heads.values())  # unconstrained
    with pytest.raises(ValueError):
        TrainConfig(cues=("no_such_feature",))
    with pytest.raises(ValueError):
        TrainConfig(hash_bits=10)  # n-grams need independent, unconstrained heads
    with pytest.raises(ValueError):
        TrainConfig(prior_rows=-1)
