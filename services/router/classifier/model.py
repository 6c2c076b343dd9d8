"""The serving side of the classifier: a small logistic model evaluated with numpy only.

The model has one logistic head per prompt *shape* — ``choice`` (a question with lettered options) and ``open``
(everything else: word problems, instructions, chat) — because what makes a prompt hard differs between the two
(the measured comparison is in docs/benchmarks.md). A head is ``sigmoid(bias + w · standardise(dense) [+ Σ hashed
n-gram weights])``; its per-feature terms ``w_i · z_i`` are the reasons of a decision.

The artifact is a directory: ``model.json`` (heads, feature names, calibration, provenance — small and readable)
and, only for a model with hashed n-grams, ``ngrams.npz`` (one weight vector per head).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.router.classifier import features as feat
from services.router.classifier.calibration import Calibration
from services.router.classifier.types import Message

FloatArray = npt.NDArray[np.float64]

ARTIFACT_VERSION = 1
MODEL_FILE = "model.json"
NGRAM_FILE = "ngrams.npz"
#: The committed, trained artifact (``costmesh router train --data dev.jsonl --out <this>`` rebuilds it).
DEFAULT_ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts" / "default"

GATE_CHOICE = "choice"
GATE_OPEN = "open"
GATES = (GATE_CHOICE, GATE_OPEN)
_CHOICES_INDEX = feat.DENSE_FEATURES.index("choices")


def gate_of(dense: FloatArray) -> str:
    """The head a request goes to: ``choice`` when it is a multiple-choice question."""
    return GATE_CHOICE if dense[_CHOICES_INDEX] >= 2 else GATE_OPEN


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class LinearHead:
    """A logistic head over standardised dense features, optionally plus hashed n-gram weights."""

    mean: FloatArray
    scale: FloatArray
    weights: FloatArray
    bias: float
    ngram_weights: FloatArray | None = None
    # (index, weight, reason name) of the features with w > 0, in index order: the only ones that can be reasons
    _pushers: tuple[tuple[int, float, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pushers = tuple(
            (i, w, feat.REASONS.get(feat.DENSE_FEATURES[i], feat.DENSE_FEATURES[i]))
            for i, w in enumerate(self.weights.tolist())
            if w > 0
        )
        object.__setattr__(self, "_pushers", pushers)

    def standardise(self, dense: FloatArray) -> FloatArray:
        """The standardised features ``z`` (what :meth:`logit` and :meth:`reasons` take as ``z``)."""
        z: FloatArray = (dense - self.mean) / self.scale
        return z

    def logit(
        self, dense: FloatArray, hashed: npt.NDArray[np.int64] | None = None, *, z: FloatArray | None = None
    ) -> tuple[float, FloatArray]:
        """The logit and the per-feature terms ``w_i · z_i`` of the standardised features ``z``."""
        if z is None:
            z = self.standardise(dense)
        contrib: FloatArray = self.weights * z
        logit = self.bias + float(contrib.sum())
        if self.ngram_weights is not None and hashed is not None and hashed.size:
            logit += float(self.ngram_weights[hashed].sum())
        return logit, contrib

    def reasons(self, dense: FloatArray, top: int = 3, *, z: FloatArray | None = None) -> tuple[str, ...]:
        """Features present above their usual level that push the score up, strongest first, by reason name.

        Only terms with ``w > 0`` and ``z > 0`` count: "this prompt has a lot of X, and X means harder" is a reason;
        the absence of something that would lower the score is not.
        """
        # Plain Python over the few positive weights: numpy's per-call overhead dominates on one short vector, and
        # the float64 arithmetic (w * z, summed per reason in feature order) is the same.
        zs = (self.standardise(dense) if z is None else z).tolist()
        by_reason: dict[str, float] = {}
        for i, w, name in self._pushers:
            zi = zs[i]
            if zi > 0:
                push = w * zi
                if push:
                    by_reason[name] = by_reason.get(name, 0.0) + push
        ranked = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        return tuple(name for name, _ in ranked[:top])

    def to_dict(self) -> dict[str, Any]:
        return {
            "bias": self.bias,
            "mean": [float(v) for v in self.mean],
            "scale": [float(v) for v in self.scale],
            "weights": [float(v) for v in self.weights],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], n: int, ngram_weights: FloatArray | None = None) -> LinearHead:
        head = cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            weights=np.asarray(data["weights"], dtype=np.float64),
            bias=float(data["bias"]),
            ngram_weights=ngram_weights,
        )
        if not (head.mean.shape == head.scale.shape == head.weights.shape == (n,)):
            raise ValueError(f"head has the wrong number of features (expected {n})")
        if np.any(head.scale <= 0):
            raise ValueError("head scales must be positive")
        return head


@dataclass(frozen=True, slots=True)
class Scored:
    """A classifier output: the score, the head that produced it, and the reasons it is high."""

    score: float
    gate: str
    reasons: tuple[str, ...]
    token_estimate: int


@dataclass(frozen=True, slots=True)
class ComplexityModel:
    """Heads per prompt shape, the dense feature names they expect, a calibration and provenance."""

    heads: Mapping[str, LinearHead]
    calibration: Calibration
    feature_names: tuple[str, ...] = feat.DENSE_FEATURES
    hash_bits: int = 0  # 0 = no n-gram weights
    meta: Mapping[str, Any] = field(default_factory=dict)
    # the dense features some head weighs: the only ones ``features`` computes (the others are 0 and weigh nothing)
    _need: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.feature_names != feat.DENSE_FEATURES:
            raise ValueError(
                "the artifact was trained on a different feature set; retrain it with `costmesh router train`"
            )
        missing = [g for g in GATES if g not in self.heads]
        if missing:
            raise ValueError(f"model has no head for {missing}")
        weighed = np.zeros(len(self.feature_names), dtype=bool)
        for head in self.heads.values():
            weighed |= head.weights != 0
        object.__setattr__(self, "_need", frozenset(n for n, w in zip(self.feature_names, weighed, strict=True) if w))

    @property
    def uses_ngrams(self) -> bool:
        return self.hash_bits > 0

    @property
    def needed_features(self) -> frozenset[str]:
        """The dense features some head weighs (the gate's and the length prior's are always computed too)."""
        return self._need

    def features(self, messages: Sequence[Message], max_tokens: int = 0) -> feat.Features:
        return feat.extract(messages, max_tokens=max_tokens, hash_bits=self.hash_bits, need=self._need)

    def score_features(self, features: feat.Features, *, top: int = 3) -> Scored:
        gate = gate_of(features.dense)
        head = self.heads[gate]
        z = head.standardise(features.dense)
        logit, _ = head.logit(features.dense, features.hashed if self.uses_ngrams else None, z=z)
        reasons = head.reasons(features.dense, top, z=z) if top else ()
        return Scored(score=sigmoid(logit), gate=gate, reasons=reasons, token_estimate=features.token_estimate)

    def score(self, messages: Sequence[Message], max_tokens: int = 0, *, top: int = 3) -> Scored:
        """Score in [0, 1]: the estimated probability that the full tier is needed."""
        return self.score_features(self.features(messages, max_tokens), top=top)

    def memory_bytes(self) -> int:
        """Bytes of the model's parameters (arrays) in memory."""
        total = 0
        for head in self.heads.values():
            total += head.mean.nbytes + head.scale.nbytes + head.weights.nbytes
            if head.ngram_weights is not None:
                total += head.ngram_weights.nbytes
        return total + 8 * len(self.calibration.thresholds)

    # -- artifact ------------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": ARTIFACT_VERSION,
            "kind": "gated-logistic",
            "feature_names": list(self.feature_names),
            "hash_bits": self.hash_bits,
            "heads": {g: h.to_dict() for g, h in self.heads.items()},
            "calibration": self.calibration.to_dict(),
            "meta": dict(self.meta),
        }
        (directory / MODEL_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        ngram_path = directory / NGRAM_FILE
        if self.uses_ngrams:
            arrays = {g: np.asarray(h.ngram_weights, dtype=np.float32) for g, h in self.heads.items()}
            np.savez_compressed(ngram_path, **arrays)  # type: ignore[arg-type]
        elif ngram_path.exists():
            ngram_path.unlink()

    @classmethod
    def load(cls, directory: Path | None = None) -> ComplexityModel:
        directory = DEFAULT_ARTIFACT_DIR if directory is None else directory
        path = directory / MODEL_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no classifier artifact at {path}; run `costmesh router train`") from None
        if doc.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"{path}: unsupported artifact version {doc.get('version')!r}")
        names = tuple(doc["feature_names"])
        hash_bits = int(doc.get("hash_bits", 0))
        ngrams: dict[str, FloatArray] = {}
        if hash_bits:
            with np.load(directory / NGRAM_FILE) as z:
                ngrams = {g: z[g].astype(np.float64) for g in z.files}
        heads = {
            g: LinearHead.from_dict(h, len(names), ngrams.get(g) if hash_bits else None)
            for g, h in doc["heads"].items()
        }
        return cls(
            heads=heads,
            calibration=Calibration.from_dict(doc["calibration"]),
            feature_names=names,
            hash_bits=hash_bits,
            meta=doc.get("meta", {}),
        )

    def with_calibration(self, calibration: Calibration) -> ComplexityModel:
        return ComplexityModel(
            heads=self.heads,
            calibration=calibration,
            feature_names=self.feature_names,
            hash_bits=self.hash_bits,
            meta=self.meta,
        )
