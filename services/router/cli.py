"""``costmesh router ...``: train, calibrate, score and evaluate the complexity classifier on JSONL records.

Every command reads the record format of ``router/dev.jsonl`` (see ``services/router/classifier/data.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from services.router.classifier.calibration import DEFAULT_BAND_SHARE, fit_calibration, report
from services.router.classifier.data import Record, RecordError, families, iter_json_lines, load_records, parse_record
from services.router.classifier.metrics import DEFAULT_NUM_RESULTS, FamilyMetrics, family_metrics
from services.router.classifier.model import DEFAULT_ARTIFACT_DIR, ComplexityModel
from services.router.classifier.train import (
    DEFAULT_C,
    DEFAULT_MIN_ROWS,
    DEFAULT_PRIOR_ROWS,
    PREVIOUS,
    TrainConfig,
    featurize,
    score_featurized,
    train,
)
from services.router.classifier.types import user_messages

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

ModelOpt = Annotated[Path, typer.Option("--model", help="classifier artifact directory")]


def _load(path: Path, *, labelled: bool) -> list[Record]:
    try:
        return load_records(path, labelled=labelled)
    except (RecordError, OSError) as err:
        raise typer.BadParameter(str(err)) from None


def _model(path: Path) -> ComplexityModel:
    try:
        return ComplexityModel.load(path)
    except (OSError, ValueError, KeyError) as err:
        raise typer.BadParameter(f"cannot load the classifier from {path}: {err}") from None


def _scores(model: ComplexityModel, records: list[Record]) -> np.ndarray:
    return score_featurized(model, featurize(records, model.hash_bits))


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}%"


def evaluate(model: ComplexityModel, records: list[Record], num_results: int) -> list[FamilyMetrics]:
    scores = _scores(model, records)
    out: list[FamilyMetrics] = []
    for fam in families(records):
        idx = [i for i, r in enumerate(records) if r.family == fam]
        out.append(
            family_metrics(
                fam,
                scores[idx],
                [records[i].quality(full=False) for i in idx],
                [records[i].quality(full=True) for i in idx],
                num_results=num_results,
            )
        )
    return out


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option(help="labelled records (JSONL)")],
    out: Annotated[Path, typer.Option(help="directory the artifact is written to")],
    c: Annotated[float, typer.Option(help="inverse L2 regularisation of the cue weights")] = DEFAULT_C,
    fusion_c: Annotated[
        float | None, typer.Option(help="tie the two heads' cue weights with this inverse strength (default: no tie)")
    ] = None,
    prior_rows: Annotated[
        float, typer.Option(help="shrinkage toward the length prior: prompts of a shape at which both weigh the same")
    ] = DEFAULT_PRIOR_ROWS,
    min_rows: Annotated[
        int, typer.Option(help="a head trained on fewer prompts of its shape is the length prior alone")
    ] = DEFAULT_MIN_ROWS,
    previous: Annotated[
        bool, typer.Option("--previous", help="the previous design: independent heads over every feature")
    ] = False,
    hash_bits: Annotated[int, typer.Option(help="> 0 (with --previous): add hashed word n-grams, 2**bits buckets")] = 0,
    cheap_share: Annotated[float, typer.Option(help="default cheap-share target of the calibration")] = 0.8,
    band_share: Annotated[float, typer.Option(help="share of traffic in the uncertainty band")] = DEFAULT_BAND_SHARE,
    seed: Annotated[int, typer.Option(help="random seed (the fit is deterministic anyway)")] = 0,
) -> None:
    """Train the classifier on labelled records and write the artifact (model.json) to OUT."""
    records = _load(data, labelled=True)
    try:
        if previous:
            cfg = replace(PREVIOUS, c=c, hash_bits=hash_bits)
        else:
            cfg = TrainConfig(c=c, fusion_c=fusion_c, prior_rows=prior_rows, min_rows=min_rows, hash_bits=hash_bits)
        cfg = replace(cfg, cheap_share=cheap_share, band_share=band_share, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    model = train(records, cfg, provenance={"data": data.name, "data_sha256": digest})
    model.save(out)
    cal = model.calibration
    typer.echo(
        f"trained on {len(records)} records ({', '.join(f'{k} {v}' for k, v in model.meta['families'].items())}); "
        f"threshold {cal.threshold_for():.4f} for cheap share {cal.cheap_share:.2f} "
        f"(band ±{cal.band_for():.4f}); wrote {out}"
    )


@app.command("calibrate")
def calibrate_cmd(
    data: Annotated[Path, typer.Option(help="representative prompts (JSONL; outcomes optional)")],
    cheap_share: Annotated[float, typer.Option(help="target share of requests sent to the cheap tier")] = 0.8,
    band_share: Annotated[float, typer.Option(help="share of traffic in the uncertainty band")] = DEFAULT_BAND_SHARE,
    model_dir: ModelOpt = DEFAULT_ARTIFACT_DIR,
    out: Annotated[Path | None, typer.Option(help="write the recalibrated artifact here (default: print only)")] = None,
) -> None:
    """Calibrate the threshold so CHEAP_SHARE of DATA's prompts score below it; report what that does."""
    if not 0.0 <= cheap_share <= 1.0 or not 0.0 <= band_share <= 1.0:
        raise typer.BadParameter("--cheap-share and --band-share must be in [0, 1]")
    records = _load(data, labelled=False)
    model = _model(model_dir)
    scores = _scores(model, records)
    cal = fit_calibration(scores, cheap_share=cheap_share, band_share=band_share)
    rep = report(cal, scores)
    typer.echo(
        f"threshold {rep.threshold:.4f}  band ±{rep.band:.4f}  "
        f"classifier cheap share {_pct(rep.classifier_cheap_share)}  "
        f"effective cheap share {_pct(rep.effective_cheap_share)} (the band routes {_pct(rep.routed_up_share)} up)"
    )
    labelled = [i for i, r in enumerate(records) if r.labelled]
    if labelled:
        typer.echo(f"{'family':<12}{'n':>7}{'cheap':>9}{'quality':>10}{'full-only':>11}{'PGR':>8}")
        for fam in families(records[i] for i in labelled):
            idx = [i for i in labelled if records[i].family == fam]
            t, b = rep.threshold, rep.band
            full = [bool(scores[i] >= t - b) if b > 0 else bool(scores[i] >= t) for i in idx]
            q = float(np.mean([records[i].quality(full=f) for i, f in zip(idx, full, strict=True)]))
            cq = float(np.mean([records[i].quality(full=False) for i in idx]))
            fq = float(np.mean([records[i].quality(full=True) for i in idx]))
            pgr = (q - cq) / (fq - cq) if fq != cq else math.nan
            typer.echo(f"{fam:<12}{len(idx):>7}{_pct(1 - float(np.mean(full))):>9}{q:>10.3f}{fq:>11.3f}{pgr:>8.2f}")
    if out is not None:
        model.with_calibration(cal).save(out)
        typer.echo(f"wrote {out}")


@app.command("score")
def score_cmd(
    input_path: Annotated[Path, typer.Option("--input", help="records to score (JSONL; only 'prompt' is needed)")],
    output: Annotated[Path, typer.Option(help="where the scored records go (JSONL)")],
    model_dir: ModelOpt = DEFAULT_ARTIFACT_DIR,
    cheap_share: Annotated[float | None, typer.Option(help="target (default: the artifact's)")] = None,
) -> None:
    """Copy every record of INPUT to OUTPUT with 'score' (P(full tier needed)) and 'tier' added."""
    model = _model(model_dir)
    n = 0
    try:
        with output.open("w", encoding="utf-8") as fh:
            for line_no, obj in iter_json_lines(input_path):
                rec = parse_record(obj, f"{input_path}:{line_no}")
                scored = model.score(user_messages(rec.prompt), rec.max_tokens, top=0)
                verdict = model.calibration.route(scored.score, cheap_share)
                fh.write(json.dumps({**obj, "score": round(scored.score, 6), "tier": verdict.tier.label}) + "\n")
                n += 1
    except (RecordError, OSError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"scored {n} records into {output}")


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option(help="labelled records (JSONL)")],
    model_dir: ModelOpt = DEFAULT_ARTIFACT_DIR,
    num_results: Annotated[int, typer.Option(help="threshold bins of the sweep (RouteLLM: 10)")] = DEFAULT_NUM_RESULTS,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the metrics as JSON")] = None,
) -> None:
    """Per source family: cheap-only and full-only quality, APGR, CPT(50%), CPT(80%) (RouteLLM's definitions).

    On the data the model was trained on these numbers are in-sample; bench/router.py reports cross-validated ones.
    """
    records = _load(data, labelled=True)
    rows = evaluate(_model(model_dir), records, num_results)
    typer.echo(f"{'family':<12}{'n':>7}{'cheap-only':>12}{'full-only':>11}{'APGR':>8}{'CPT(50%)':>10}{'CPT(80%)':>10}")
    for m in rows:
        typer.echo(
            f"{m.family:<12}{m.n:>7}{m.cheap_quality:>12.3f}{m.full_quality:>11.3f}{m.apgr:>8.3f}"
            f"{_pct(m.cpt50):>10}{_pct(m.cpt80):>10}"
        )
    if json_out is not None:
        doc = [
            {
                "family": m.family,
                "n": m.n,
                "cheap_only": m.cheap_quality,
                "full_only": m.full_quality,
                "apgr": m.apgr,
                "cpt50": None if math.isnan(m.cpt50) else m.cpt50,
                "cpt80": None if math.isnan(m.cpt80) else m.cpt80,
                "curve": [{"full_share": p.full_share, "quality": p.quality} for p in m.curve],
            }
            for m in rows
        ]
        json_out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
