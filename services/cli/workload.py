"""The demo workload: several tenants and features, simple and complex prompts from public benchmark data, repeats
with changed whitespace, case and volatile fields, bursts of identical concurrent requests, and one feature whose
budget runs out mid-run. Pure data; ``services/cli/demo.py`` runs it.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources


@dataclass(frozen=True, slots=True)
class Feature:
    tenant: str
    team: str
    feature: str
    families: tuple[str, ...]
    system: str
    volatile_header: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the workload. ``burst`` > 0 groups requests sent at once."""

    tenant: str
    team: str
    feature: str
    system: str
    prompt: str
    kind: str  # unique | repeat | burst
    burst: int = 0


FEATURES = (
    Feature("acme", "support", "helpdesk", ("mmlu",), "You are Acme's helpdesk assistant. Answer briefly.", True),
    Feature("acme", "education", "math-tutor", ("gsm8k",), "You are a patient math tutor. Show the steps."),
    Feature("acme", "product", "writing", ("mt_bench",), "You are a helpful writing assistant."),
    Feature("globex", "research", "knowledge", ("mmlu",), "Answer the multiple-choice question.", True),
    Feature("globex", "marketing", "summaries", ("mt_bench", "gsm8k"), "You write concise answers."),
)
#: The feature whose small lifetime budget runs out mid-run, and its limit in micro-USD.
BUDGETED_FEATURE = ("globex", "summaries")
BUDGET_LIMIT_MICROS = 120  # a few cheap-tier answers of the local models


def load_prompts() -> list[dict[str, str]]:
    text = resources.files("services.cli").joinpath("data/demo_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _header(rng: random.Random, base: datetime) -> str:
    ts = (base + timedelta(seconds=rng.randrange(86_400 * 30))).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"Ticket {uuid.UUID(int=rng.getrandbits(128))} opened {ts}.\n"


def _respace(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    return "  " + "  ".join(words) + " \n" if rng.random() < 0.5 else text.replace(" ", "   ", 3) + "\n\n"


def _recase(text: str) -> str:
    return text.upper() if len(text) < 200 else text[:1].lower() + text[1:]


def build(seed: int = 7, *, run_id: str = "") -> list[Request]:
    """The whole workload in order; ``run_id`` is appended to tenant ids so runs never share cache or budget."""
    rng = random.Random(seed)
    base = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    prompts = load_prompts()
    by_family: dict[str, list[str]] = {}
    for p in prompts:
        by_family.setdefault(p["source"].split("/")[0], []).append(p["prompt"])
    for pool in by_family.values():
        rng.shuffle(pool)
    suffix = f"-{run_id}" if run_id else ""

    def make(f: Feature, prompt: str, kind: str, burst: int = 0) -> Request:
        return Request(f.tenant + suffix, f.team, f.feature, f.system, prompt, kind, burst)

    uniques: list[tuple[Feature, str]] = []
    cursor = {fam: 0 for fam in by_family}
    for round_ in range(40):
        f = FEATURES[round_ % len(FEATURES)]
        fam = f.families[round_ % len(f.families)]
        pool = by_family[fam]
        if cursor[fam] >= len(pool) - 3:  # the last prompts are kept for the bursts
            continue
        text = pool[cursor[fam]]
        cursor[fam] += 1
        uniques.append((f, (_header(rng, base) if f.volatile_header else "") + text))
    out = [make(f, text, "unique") for f, text in uniques]
    # Repeats of earlier prompts: re-spaced, re-cased, with a new ticket id and timestamp.
    for f, text in rng.sample(uniques, k=min(30, len(uniques))):
        body = text.split("\n", 1)[1] if f.volatile_header else text
        variant = rng.choice((_respace, lambda r, t: _recase(t)))(rng, body)
        out.insert(
            rng.randrange(len(out) // 2, len(out) + 1),
            make(f, (_header(rng, base) if f.volatile_header else "") + variant, "repeat"),
        )
    # Bursts: the same new question sent by many callers at once.
    for b, f in enumerate((FEATURES[0], FEATURES[2], FEATURES[3]), start=1):
        fam = f.families[0]
        text = by_family[fam][-b]
        out.insert(rng.randrange(len(out) // 3, len(out)), make(f, text, "burst", burst=b))
    return out


def expand_bursts(requests: list[Request], size: int) -> list[list[Request]]:
    """Groups to send: a burst request becomes ``size`` identical requests sent at once; others go alone."""
    return [[r] * size if r.kind == "burst" else [r] for r in requests]
