"""Evaluation protocols: which records train and which are scored, and margins over length-only."""

from __future__ import annotations

import random

import numpy as np
import numpy.typing as npt

from services.router.classifier import evaluation as ev
from services.router.classifier import features as feat
from services.router.classifier.data import Record

FAMILIES = ("gsm8k", "mmlu", "mt_bench")


def records(seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    out: list[Record] = []
    for i in range(60):
        steps = rng.randint(1, 6)
        out.append(
            Record(
                prompt=f"q{i}: " + "then she buys 3 more apples. " * steps,
                source="gsm8k",
                cheap_correct=rng.random() > steps / 7,
                full_correct=rng.random() > 0.1,
            )
        )
    for s in range(6):
        for i in range(15):
            hard = rng.random() < 0.4
            out.append(
                Record(
                    prompt=f"subject {s} question {i} " + "long stem " * (8 if hard else 1) + "A. x B. y C. z D. w",
                    source=f"mmlu/s{s}",
                    cheap_correct=not hard or rng.random() < 0.3,
                    full_correct=rng.random() > 0.1,
                )
            )
    for c in ("writing", "math", "coding", "roleplay"):
        for i in range(5):
            out.append(
                Record(
                    prompt=f"{c} task {i} " + "detail " * rng.randint(1, 20),
                    source=f"mt_bench/{c}",
                    cheap_score=float(rng.randint(5, 10)),
                    full_score=float(rng.randint(7, 10)),
                )
            )
    return out


def test_subject_out_holds_out_each_subject_and_splits_gsm8k_by_question() -> None:
    recs = records()
    folds = ev.subject_out_folds(recs, question_folds=5)
    assert (folds >= 0).all()
    by_source: dict[str, set[int]] = {}
    for r, f in zip(recs, folds.tolist(), strict=True):
        by_source.setdefault(r.source, set()).add(f)
    assert all(len(v) == 1 for k, v in by_source.items() if k != "gsm8k")  # one fold per subject / category
    assert len({next(iter(v)) for k, v in by_source.items() if k != "gsm8k"}) == 6 + 4
    assert len(by_source["gsm8k"]) == 5
    assert not by_source["gsm8k"] & set().union(*(v for k, v in by_source.items() if k != "gsm8k"))


def test_source_out_is_one_fold_per_family() -> None:
    recs = records()
    folds = ev.source_out_folds(recs)
    for fam in FAMILIES:
        assert len({f for r, f in zip(recs, folds.tolist(), strict=True) if r.family == fam}) == 1
    assert len(set(folds.tolist())) == 3


def test_halves_split_subjects_whole_and_questions_evenly() -> None:
    recs = records()
    for seed in range(4):
        folds = ev.halves_folds(recs, seed)
        assert set(folds.tolist()) == {0, 1}
        sides: dict[str, set[int]] = {}
        for r, f in zip(recs, folds.tolist(), strict=True):
            sides.setdefault(r.source, set()).add(f)
        assert all(len(v) == 1 for k, v in sides.items() if k != "gsm8k")
        assert sum(1 for k, v in sides.items() if k.startswith("mmlu/") and v == {0}) == 3
        g = folds[[i for i, r in enumerate(recs) if r.family == "gsm8k"]]
        assert g.sum() == g.size // 2


def test_grouped_kfold_never_splits_a_subject() -> None:
    recs = records()
    folds = ev.group_folds(recs, 5, seed=1)
    for s in {r.source for r in recs if r.family == "mmlu"}:
        assert len({f for r, f in zip(recs, folds.tolist(), strict=True) if r.source == s}) == 1


def test_out_of_fold_never_trains_on_what_it_scores() -> None:
    recs = records()
    folds = ev.subject_out_folds(recs, question_folds=3)
    calls: list[int] = []

    def scorer(tr: npt.NDArray[np.intp], te: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
        assert not set(tr.tolist()) & set(te.tolist())
        assert len(set(folds[te].tolist())) == 1
        calls.append(te.size)
        return te.astype(np.float64)

    scores = ev.out_of_fold(scorer, folds)
    assert sum(calls) == len(recs) and not np.isnan(scores).any()


def test_length_scores_have_no_margin_and_an_oracle_beats_length() -> None:
    recs = records()
    length = np.array([feat.estimate_tokens(r.prompt) for r in recs], dtype=np.float64)
    gain = np.array([r.quality(full=True) - r.quality(full=False) for r in recs])
    protocols = ev.protocols(recs, k=3, seeds=2, halves_seeds=2, question_folds=3)
    for p in protocols.values():
        same = ev.evaluate(recs, p, scorer=lambda tr, te: length[te], baseline=length, families=FAMILIES)
        oracle = ev.evaluate(recs, p, fixed=lambda run: gain, baseline=length, families=FAMILIES)
        for fam in FAMILIES:
            assert same.summary(fam)["margin"] == 0.0
            assert oracle.summary(fam)["margin_min"] > 0.0
        expected = 1 if p.pooled else 2
        assert same.summary("mmlu")["evaluations"] == len(p.runs) * expected
