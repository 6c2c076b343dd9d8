"""Training the classifier (needs scikit-learn and scipy, the ``train`` extra; serving does not).

Deterministic: the same records and config give the same artifact (L-BFGS on a fixed problem; no sampling).

**The shipped design** (chosen because it generalises to subjects and sources it never saw; the protocols and the
designs that lost are in docs/benchmarks.md):

1. *Few cues, monotone.* Only structural cues that mean "harder" whatever the topic — length, numbers, arithmetic,
   maths and code vocabulary and syntax, multi-step and reasoning cues, option length, numeric options, NOT/EXCEPT
   questions, question length (:data:`DEFAULT_CUES`) — and every weight is bounded at >= 0: a cue can raise the
   score or do nothing, never lower it. The topic cues that fit dev's subjects (technical vocabulary, named
   entities, scenario words, language) are left out, and so are constraints (fitted weight ~0.007, and their
   phrase scan was a tenth of a request's cost).
2. *Two heads.* One head per prompt shape (``choice``, ``open``), fitted on its own prompts (``fusion_c`` would tie
   their weights together: measured, it lost).
3. *Shrinkage toward a length prior.* Each head's score is a blend of its standardised logit and the standardised
   prompt length, the model's share being ``n / (n + prior_rows)`` for a head trained on ``n`` prompts (0 below
   ``min_rows``): a shape the trainer saw little or nothing of is ranked by length, as prompt length alone does.
4. A per-head Platt scaling (two parameters) turns the blend back into a probability, so the heads' scores are
   comparable for the pooled calibration. Everything is linear in the dense features, so the artifact is the same
   ``gated-logistic`` as before: per head, a bias and one weight per feature.

:data:`PREVIOUS` is the previous design (independent, unconstrained heads over the 31 features it had, scikit-learn's
``LogisticRegression``, no prior); with ``hash_bits`` it adds hashed n-grams.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.router.classifier import features as feat
from services.router.classifier.calibration import DEFAULT_BAND_SHARE, DEFAULT_CHEAP_SHARE, fit_calibration
from services.router.classifier.data import BOTH_WRONG_TARGET, SCORE_GAP_FULL, Record
from services.router.classifier.model import GATE_CHOICE, GATE_OPEN, GATES, ComplexityModel, LinearHead, gate_of
from services.router.classifier.types import user_messages

FloatArray = npt.NDArray[np.float64]

#: Inverse L2 strength of the cue weights of the committed artifact.
DEFAULT_C = 0.01
#: Inverse strength of the penalty tying the two heads' cue weights when they are tied (the default is not: tied
#: heads lost on gsm8k, see docs/benchmarks.md).
FUSION_C = 0.001
#: Prompts of a shape at which its head's own score and the length prior weigh the same.
DEFAULT_PRIOR_ROWS = 1000.0
#: Prompts of a shape below which its head is the length prior alone (too few to weigh cues on).
DEFAULT_MIN_ROWS = 100
#: The cues of the committed artifact: structural signs of a harder request, whatever the topic.
DEFAULT_CUES: tuple[str, ...] = (
    "user_tokens",
    "quantitative",
    "arithmetic",
    "math_words",
    "code_block",
    "code_words",
    "multi_step",
    "reasoning",
    "choice_tokens",
    "numeric_choices",
    "negation_cue",
    "stem_tokens",
)
#: The dense features of the previous design (all there were before the saturating ``quantitative`` / ``arithmetic``).
PREVIOUS_FEATURES: tuple[str, ...] = feat.DENSE_FEATURES[: feat.DENSE_FEATURES.index("system_tokens") + 1]
#: The dense feature the length prior is: the token estimate of the whole conversation (what length-only ranks by).
PRIOR_FEATURE = "prompt_tokens"
_PRIOR = feat.DENSE_FEATURES.index(PRIOR_FEATURE)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters. The defaults are what the committed artifact uses (chosen under the protocols of
    ``services/router/classifier/evaluation.py``; see docs/benchmarks.md)."""

    c: float = DEFAULT_C  # inverse L2 strength of the cue weights (strong: the cues must transfer across topics)
    cues: tuple[str, ...] | None = DEFAULT_CUES  # dense features the heads may weigh (None: all of them)
    monotone: bool = True  # every cue weight >= 0
    fusion_c: float | None = None  # inverse strength of a tie between the two heads' weights (None: independent)
    prior_rows: float = DEFAULT_PRIOR_ROWS  # shrinkage toward the length prior (0: none)
    min_rows: int = DEFAULT_MIN_ROWS  # a head trained on fewer prompts of its shape is the length prior alone
    hash_bits: int = 0  # > 0 adds hashed word uni/bigrams with 2**hash_bits buckets (previous design only)
    cheap_share: float = DEFAULT_CHEAP_SHARE
    band_share: float = DEFAULT_BAND_SHARE
    seed: int = 0
    max_iter: int = 5000

    def __post_init__(self) -> None:
        unknown = sorted(set(self.cues or ()) - set(feat.DENSE_FEATURES))
        if unknown:
            raise ValueError(f"unknown cue features {unknown}")
        if self.c <= 0 or (self.fusion_c is not None and self.fusion_c <= 0) or self.prior_rows < 0:
            raise ValueError("c and fusion_c must be > 0, prior_rows >= 0")
        if self.hash_bits and not self.independent:
            raise ValueError("hashed n-grams need independent, unconstrained heads (monotone=False, fusion_c=None)")

    @property
    def independent(self) -> bool:
        """Independent, unconstrained heads (scikit-learn), as the previous design."""
        return not self.monotone and self.fusion_c is None


#: The previous committed design: independent, unconstrained heads over every feature it had, no length prior.
PREVIOUS = TrainConfig(cues=PREVIOUS_FEATURES, monotone=False, fusion_c=None, prior_rows=0, min_rows=0)


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


def _standardisation(dense: FloatArray) -> tuple[FloatArray, FloatArray]:
    mean = dense.mean(axis=0)
    scale = dense.std(axis=0)
    scale[scale < 1e-9] = 1.0
    return mean, scale


def _soft_rows(n: int, y: FloatArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], FloatArray]:
    """Soft labels as weighted hard ones: a row with target y becomes (1, weight y) and (0, weight 1 - y)."""
    idx = np.concatenate([np.arange(n), np.arange(n)])
    labels = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    weights = np.concatenate([y, 1.0 - y])
    keep = weights > 0
    return idx[keep], labels[keep], weights[keep]


def fit_head(
    dense: FloatArray,
    hashed: Sequence[npt.NDArray[np.int64]],
    y: FloatArray,
    cfg: TrainConfig,
) -> LinearHead:
    """One unconstrained logistic head over the cue features (every dense feature when ``cues`` is None), the
    previous design, scikit-learn."""
    from scipy import sparse  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression

    cols = _cue_columns(cfg)
    mean, scale = _standardisation(dense)
    z = ((dense - mean) / scale)[:, cols]
    idx, labels, weights = _soft_rows(len(y), y)
    if len(np.unique(labels)) < 2:
        raise ValueError("training data for a head has only one class; need prompts where each tier is needed")
    model = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, random_state=cfg.seed)
    full = np.zeros(feat.N_DENSE)
    if cfg.hash_bits:
        width = 1 << cfg.hash_bits
        rows = np.repeat(np.arange(len(hashed)), [h.size for h in hashed])
        ids = np.concatenate(list(hashed)) if hashed else np.zeros(0, dtype=np.int64)
        grams = sparse.csr_matrix((np.ones(ids.size), (rows, ids)), shape=(len(hashed), width))
        x = sparse.hstack([sparse.csr_matrix(z), grams]).tocsr()
        model.fit(x[idx], labels, sample_weight=weights)
        coef = model.coef_[0]
        full[cols] = coef[: len(cols)]
        return LinearHead(
            mean=mean,
            scale=scale,
            weights=full,
            bias=float(model.intercept_[0]),
            ngram_weights=coef[len(cols) :].astype(np.float64),
        )
    model.fit(z[idx], labels, sample_weight=weights)
    full[cols] = model.coef_[0]
    return LinearHead(mean=mean, scale=scale, weights=full, bias=float(model.intercept_[0]))


def _cue_columns(cfg: TrainConfig) -> list[int]:
    return [feat.DENSE_FEATURES.index(c) for c in (cfg.cues if cfg.cues is not None else feat.DENSE_FEATURES)]


def fit_tied_heads(
    dense: FloatArray, y: FloatArray, is_choice: npt.NDArray[np.bool_], cfg: TrainConfig
) -> dict[str, LinearHead]:
    """Both heads' logistic fits at once: cross-entropy on the soft targets + ``||w_g||^2 / 2c`` per head +
    ``||w_choice - w_open||^2 / 2 fusion_c``, over the cue features only (the others keep weight 0), weights >= 0
    when ``monotone``; one standardisation over all rows (scipy's L-BFGS-B)."""
    from scipy.optimize import minimize  # type: ignore[import-untyped]

    cues = _cue_columns(cfg)
    mean, scale = _standardisation(dense)
    z = ((dense - mean) / scale)[:, cues]
    d = len(cues)
    lam = 1.0 / cfg.c
    lam_tie = 0.0 if cfg.fusion_c is None else 1.0 / cfg.fusion_c
    zc, zo, yc, yo = z[is_choice], z[~is_choice], y[is_choice], y[~is_choice]

    def objective(p: FloatArray) -> tuple[float, FloatArray]:
        bc, bo, wc, wo = p[0], p[1], p[2 : 2 + d], p[2 + d :]
        lc, lo = bc + zc @ wc, bo + zo @ wo
        rc, ro = 1.0 / (1.0 + np.exp(-lc)) - yc, 1.0 / (1.0 + np.exp(-lo)) - yo
        tie = wc - wo
        value = float((np.logaddexp(0.0, lc) - yc * lc).sum() + (np.logaddexp(0.0, lo) - yo * lo).sum())
        value += 0.5 * lam * float(wc @ wc + wo @ wo) + 0.5 * lam_tie * float(tie @ tie)
        grad = np.concatenate(
            [[rc.sum(), ro.sum()], zc.T @ rc + lam * wc + lam_tie * tie, zo.T @ ro + lam * wo - lam_tie * tie]
        )
        return value, grad

    bound = (0.0, None) if cfg.monotone else (None, None)
    bounds = [(None, None), (None, None)] + [bound] * (2 * d)
    res = minimize(
        objective, np.zeros(2 + 2 * d), jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": cfg.max_iter}
    )
    p = res.x
    heads: dict[str, LinearHead] = {}
    for g, (bias, w) in {GATE_CHOICE: (p[0], p[2 : 2 + d]), GATE_OPEN: (p[1], p[2 + d :])}.items():
        weights = np.zeros(feat.N_DENSE)
        weights[cues] = w
        heads[g] = LinearHead(mean=mean, scale=scale, weights=weights, bias=float(bias))
    return heads


def _platt(x: FloatArray, y: FloatArray) -> tuple[float, float]:
    """``(a, b)`` with ``sigmoid(a x + b)`` fitted to soft targets ``y`` (``a >= 0``: the order of ``x`` is kept)."""
    from scipy.optimize import minimize

    def objective(p: FloatArray) -> tuple[float, FloatArray]:
        logit = p[0] * x + p[1]
        r = 1.0 / (1.0 + np.exp(-logit)) - y
        value = float((np.logaddexp(0.0, logit) - y * logit).sum()) + 0.5e-3 * float(p[0] ** 2)
        return value, np.array([float(r @ x) + 1e-3 * p[0], float(r.sum())])

    res = minimize(objective, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    return float(res.x[0]), float(res.x[1])


def _mean_std(x: FloatArray) -> tuple[float, float]:
    sd = float(x.std())
    return float(x.mean()), sd if sd > 1e-9 else 1.0


def shrink_to_length_prior(
    head: LinearHead,
    dense: FloatArray,
    y: FloatArray,
    pool: FloatArray,
    pool_y: FloatArray,
    cfg: TrainConfig,
) -> tuple[LinearHead, dict[str, float]]:
    """The head whose logit is Platt(eps * z(head logit) + (1 - eps) * z(prompt length)), ``eps = rows / (rows +
    prior_rows)`` for a head trained on ``rows = len(dense)`` prompts (0 below ``min_rows``), both standardised over
    those prompts (``pool``, all the training prompts, when there are none) — written back as one linear head."""
    rows = len(dense)
    eps = rows / (rows + cfg.prior_rows) if cfg.prior_rows > 0 else 1.0
    own, own_y = (dense, y) if rows > 0 else (pool, pool_y)
    z = (own - head.mean) / head.scale
    m_mu, m_sd = _mean_std(head.bias + z @ head.weights)
    l_mu, l_sd = _mean_std(own[:, _PRIOR])
    if rows < max(cfg.min_rows, 1) or not np.any(head.weights):
        eps = 0.0  # too little learned for this shape: the prior alone
    # blend = ew . z + eb, i.e. eps * (logit - m_mu) / m_sd + (1 - eps) * (x_len - l_mu) / l_sd
    ew = head.weights * (eps / m_sd)
    ew[_PRIOR] += (1.0 - eps) * head.scale[_PRIOR] / l_sd
    eb = eps * (head.bias - m_mu) / m_sd + (1.0 - eps) * (head.mean[_PRIOR] - l_mu) / l_sd
    a, b = _platt(z @ ew + eb, own_y)
    shrunk = LinearHead(mean=head.mean, scale=head.scale, weights=a * ew, bias=a * eb + b)
    return shrunk, {"model_share": eps, "rows": float(rows), "platt_a": a, "platt_b": b}


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
    """``train`` on already featurised prompts and their targets (the benchmark's protocols reuse one
    featurisation for every fold)."""
    heads: dict[str, LinearHead] = {}
    meta_out = dict(meta or {})
    is_choice = data.gates == GATE_CHOICE
    if cfg.independent:
        for gate in GATES:
            sel = np.where(data.gates == gate)[0]
            if sel.size == 0:
                # No prompts of this shape: train this head on everything.
                sel = np.arange(len(y))
            heads[gate] = fit_head(data.dense[sel], [data.hashed[i] for i in sel], y[sel], cfg)
    else:
        heads = fit_tied_heads(data.dense, y, is_choice, cfg)
    if cfg.prior_rows > 0 or cfg.min_rows > 0:
        prior: dict[str, dict[str, float]] = {}
        for gate in GATES:
            sel = is_choice if gate == GATE_CHOICE else ~is_choice
            heads[gate], prior[gate] = shrink_to_length_prior(heads[gate], data.dense[sel], y[sel], data.dense, y, cfg)
        meta_out["length_prior"] = {"feature": PRIOR_FEATURE, "heads": prior}
    untrained = ComplexityModel(heads=heads, calibration=fit_calibration([0.0, 1.0]), hash_bits=cfg.hash_bits)
    scores = score_featurized(untrained, data)
    if not all(math.isfinite(s) for s in scores.tolist()):
        raise ValueError("training produced non-finite scores")
    return ComplexityModel(
        heads=heads,
        calibration=fit_calibration(scores, cheap_share=cfg.cheap_share, band_share=cfg.band_share),
        hash_bits=cfg.hash_bits,
        meta=meta_out,
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
