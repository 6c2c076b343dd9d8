"""The labelled record format the classifier is trained, calibrated and evaluated on (``router/dev.jsonl``).

One JSON object a line: ``prompt``, ``source`` (``family/subset``), and either ``cheap_correct`` / ``full_correct``
(booleans: exact-answer benchmarks such as gsm8k and mmlu) or ``cheap_score`` / ``full_score`` (a judge's 1-10
score: open-ended benchmarks such as mt_bench). Records without outcomes (only ``prompt``) can be scored but not
trained or evaluated on.

**What "the full tier is needed" means** (the training target, a soft label in [0, 1]):

* correctness benchmarks: 1 when the cheap model is wrong and the full one right (routing up recovers the answer);
  0.5 when both are wrong (a hard question: the cheap model's failure is the strongest signal we have, and the full
  tier is the likelier of the two to get such questions right, but this one it did not); 0 when the cheap model is
  right (routing up cannot help; this includes the rare cheap-right / full-wrong case);
* judged benchmarks: the score gap ``full - cheap`` over 3 points, clipped to [0, 1]: a 1-point gap is within
  the judge's noise (1/3), a gap of 3 or more (e.g. 7 vs 10) is a clearly worse answer (1), no gap or a better
  cheap answer is 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Judge-score gap (full - cheap) at which the full tier is fully needed.
SCORE_GAP_FULL = 3.0
#: Target of a question both tiers get wrong.
BOTH_WRONG_TARGET = 0.5


class RecordError(ValueError):
    """A line of a record file is not a valid record."""


@dataclass(frozen=True, slots=True)
class Record:
    prompt: str
    source: str = ""
    cheap_correct: bool | None = None
    full_correct: bool | None = None
    cheap_score: float | None = None
    full_score: float | None = None
    max_tokens: int = 0

    @property
    def family(self) -> str:
        """The benchmark family: the part of ``source`` before ``/``."""
        return self.source.split("/", 1)[0] if self.source else ""

    @property
    def labelled(self) -> bool:
        return self.cheap_correct is not None or self.cheap_score is not None

    def quality(self, full: bool) -> float:
        """What the tier achieved on this prompt: 0/1 correctness or the judge's score."""
        if self.cheap_correct is not None and self.full_correct is not None:
            return float(self.full_correct if full else self.cheap_correct)
        if self.cheap_score is not None and self.full_score is not None:
            return self.full_score if full else self.cheap_score
        raise RecordError(f"record from {self.source or '?'} has no outcomes")

    def target(self) -> float:
        """Soft label: how much the full tier is needed (see the module docstring)."""
        if self.cheap_correct is not None and self.full_correct is not None:
            if self.cheap_correct:
                return 0.0
            return 1.0 if self.full_correct else BOTH_WRONG_TARGET
        if self.cheap_score is not None and self.full_score is not None:
            return min(max((self.full_score - self.cheap_score) / SCORE_GAP_FULL, 0.0), 1.0)
        raise RecordError(f"record from {self.source or '?'} has no outcomes")


def _opt_bool(obj: dict[str, Any], key: str, where: str) -> bool | None:
    v = obj.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise RecordError(f"{where}: {key} must be true/false")


def _opt_float(obj: dict[str, Any], key: str, where: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RecordError(f"{where}: {key} must be a number")
    return float(v)


def parse_record(obj: Any, where: str = "record") -> Record:
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise RecordError(f"{where}: 'prompt' must be a string")
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise RecordError(f"{where}: 'source' must be a string")
    max_tokens = obj.get("max_tokens", 0)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise RecordError(f"{where}: 'max_tokens' must be a non-negative integer")
    rec = Record(
        prompt=prompt,
        source=source,
        cheap_correct=_opt_bool(obj, "cheap_correct", where),
        full_correct=_opt_bool(obj, "full_correct", where),
        cheap_score=_opt_float(obj, "cheap_score", where),
        full_score=_opt_float(obj, "full_score", where),
        max_tokens=max_tokens,
    )
    if (rec.cheap_correct is None) != (rec.full_correct is None):
        raise RecordError(f"{where}: cheap_correct and full_correct go together")
    if (rec.cheap_score is None) != (rec.full_score is None):
        raise RecordError(f"{where}: cheap_score and full_score go together")
    return rec


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line."""
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{n}: not JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def load_records(path: Path, *, labelled: bool = True) -> list[Record]:
    """Every record of a JSONL file; with ``labelled`` every record must carry outcomes."""
    out: list[Record] = []
    for n, obj in iter_json_lines(path):
        rec = parse_record(obj, f"{path}:{n}")
        if labelled and not rec.labelled:
            raise RecordError(f"{path}:{n}: no outcomes (cheap_correct/full_correct or cheap_score/full_score)")
        out.append(rec)
    if not out:
        raise RecordError(f"{path}: no records")
    return out


def families(records: Iterable[Record]) -> list[str]:
    """Distinct families in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r.family, None)
    return list(seen)
