"""Training the classifier (needs scikit-learn, the ``train`` extra; serving does not).

Deterministic: the same records and config give the same artifact (L-BFGS on a fixed problem; no sampling).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.router.classifier import features as feat
from services.router.classifier.calibration import DEFAULT_BAND_SHARE, DEFAULT_CHEAP_SHARE, fit_calibration
from services.router.classifier.data import BOTH_WRONG_TARGET, SCORE_GAP_FULL, Record
from services.router.classifier.model import GATES, ComplexityModel, LinearHead, gate_of
from services.router.classifier.types import user_messages

FloatArray = npt.NDArray[np.float64]

#: Inverse L2 strength of the committed artifact.
DEFAULT_C = 0.01


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters. The defaults are what the committed artifact uses (chosen by grouped CV, see the docs)."""

    c: float = DEFAULT_C  # inverse L2 strength of the logistic heads (strong: the features must transfer across topics)
    hash_bits: int = 0  # > 0 adds hashed word uni/bigrams with 2**hash_bits buckets (measured: it overfits topics)
    cheap_share: float = DEFAULT_CHEAP_SHARE
    band_share: float = DEFAULT_BAND_SHARE
    seed: int = 0
    max_iter: int = 5000


@dataclass(frozen=True, slots=True)
class Featurized:
    dense: FloatArray  # (n, N_DENSE)
    hashed: list[npt.NDArray[np.int64]]
    gates: npt.NDArray[np.str_]


def featurize(records: Sequence[Record], hash_bits: int = 0) -> Featurized:
    dense = np.zeros((len(records), feat.N_DENSE), dtype=np.float64)
    hashed: list[npt.NDArray[np.int64]] = []
    for i, r in enumerate(records):
        f = feat.extract(user_messages(r.prompt), max_tokens=r.max_tokens, hash_bits=hash_bits)
        dense[i] = f.dense
        hashed.append(f.hashed)
    gates = np.array([gate_of(d) for d in dense])
    return Featurized(dense=dense, hashed=hashed, gates=gates)


def _soft_rows(n: int, y: FloatArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], FloatArray]:
    """Soft labels as weighted hard ones: a row with target y becomes (1, weight y) and (0, weight 1 - y)."""
    idx = np.concatenate([np.arange(n), np.arange(n)])
    labels = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    weights = np.concatenate([y, 1.0 - y])
    keep = weights > 0
    return idx[keep], labels[keep], weights[keep]


def fit_head(dense: FloatArray, hashed: Sequence[npt.NDArray[np.int64]], y: FloatArray, cfg: TrainConfig) -> LinearHead:
    from scipy import sparse  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression

    mean = dense.mean(axis=0)
    scale = dense.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (dense - mean) / scale
    idx, labels, weights = _soft_rows(len(y), y)
    if len(np.unique(labels)) < 2:
        raise ValueError("training data for a head has only one class; need prompts where each tier is needed")
    model = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, random_state=cfg.seed)
    if cfg.hash_bits:
        width = 1 << cfg.hash_bits
        rows = np.repeat(np.arange(len(hashed)), [h.size for h in hashed])
        cols = np.concatenate(list(hashed)) if hashed else np.zeros(0, dtype=np.int64)
        grams = sparse.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(hashed), width))
        x = sparse.hstack([sparse.csr_matrix(z), grams]).tocsr()
        model.fit(x[idx], labels, sample_weight=weights)
        coef = model.coef_[0]
        return LinearHead(
            mean=mean,
            scale=scale,
            weights=coef[: feat.N_DENSE].astype(np.float64),
            bias=float(model.intercept_[0]),
            ngram_weights=coef[feat.N_DENSE :].astype(np.float64),
        )
    model.fit(z[idx], labels, sample_weight=weights)
    weights = model.coef_[0].astype(np.float64)
    return LinearHead(mean=mean, scale=scale, weights=weights, bias=float(model.intercept_[0]))


def train(
    records: Sequence[Record], cfg: TrainConfig = TrainConfig(), *, provenance: Mapping[str, Any] | None = None
) -> ComplexityModel:
    """Fit both heads on labelled records and calibrate the threshold on their scores."""
    if not records:
        raise ValueError("no training records")
    data = featurize(records, cfg.hash_bits)
    y = np.array([r.target() for r in records], dtype=np.float64)
    meta: dict[str, Any] = {
        "trainer": "services.router.classifier.train",
        "config": asdict(cfg),
        "records": len(records),
        "families": dict(sorted(Counter(r.family for r in records).items())),
        "gates": {g: int((data.gates == g).sum()) for g in GATES},
        "target": {
            "correctness": f"1 if cheap wrong and full right; {BOTH_WRONG_TARGET} if both wrong; 0 if cheap right",
            "judged": f"clip((full_score - cheap_score) / {SCORE_GAP_FULL}, 0, 1)",
        },
        **dict(provenance or {}),
    }
    return train_featurized(data, y, cfg, meta=meta)


def train_featurized(
    data: Featurized, y: FloatArray, cfg: TrainConfig = TrainConfig(), *, meta: Mapping[str, Any] | None = None
) -> ComplexityModel:
    """``train`` on already featurised prompts and their targets (the benchmark's cross-validation reuses one
    featurisation for every fold)."""
    heads: dict[str, LinearHead] = {}
    for gate in GATES:
        sel = np.where(data.gates == gate)[0]
        if sel.size == 0:
            # No prompts of this shape: train this head on everything.
            sel = np.arange(len(y))
        heads[gate] = fit_head(data.dense[sel], [data.hashed[i] for i in sel], y[sel], cfg)
    untrained = ComplexityModel(heads=heads, calibration=fit_calibration([0.0, 1.0]), hash_bits=cfg.hash_bits)
    scores = score_featurized(untrained, data)
    return ComplexityModel(
        heads=heads,
        calibration=fit_calibration(scores, cheap_share=cfg.cheap_share, band_share=cfg.band_share),
        hash_bits=cfg.hash_bits,
        meta=dict(meta or {}),
    )


def subset(data: Featurized, idx: npt.NDArray[np.intp]) -> Featurized:
    return Featurized(dense=data.dense[idx], hashed=[data.hashed[i] for i in idx], gates=data.gates[idx])


def score_featurized(model: ComplexityModel, data: Featurized) -> FloatArray:
    """Scores of already featurised prompts (vectorised per head; same numbers as ``model.score``)."""
    out = np.zeros(len(data.gates), dtype=np.float64)
    for gate, head in model.heads.items():
        sel = np.where(data.gates == gate)[0]
        if sel.size == 0:
            continue
        z = head.bias + ((data.dense[sel] - head.mean) / head.scale) @ head.weights
        if model.uses_ngrams and head.ngram_weights is not None:
            w = head.ngram_weights
            z = z + np.array([float(w[data.hashed[i]].sum()) for i in sel])
        out[sel] = 1.0 / (1.0 + np.exp(-z))
    return out
