"""merge: all particles with the estimates of every parameter type, one RELION STAR.

Images HEMNMA aligned keep HEMNMA's values (more accurate than any network's); the others take
each parameter type from its network, and are marked untrusted (`_dhTrusted 0`) when a network
they depend on failed its verdict (`deephemnma quality`). Images HEMNMA's quality flag marks (the
model does not explain them) keep their `_dhFlagged 1` and are marked untrusted too, and so are
images the networks answered whose disagreement with the model at those answers (−
`_dhModelAgreement`) is far above that of the unflagged images HEMNMA aligned and the networks
did not train on (robust z-score `_dhAgreementZ` above `--flag-z`): a wrong answer, or an image
the model does not explain.
`--out-md` says what was trusted and why. The column `_dhSource<Type>` says where
each value came from (network | hemnma). A network's `_dhUncertainty<Type>` and the networks'
`_dhModelAgreement` are kept on every row, HEMNMA-aligned ones included (there they are what
calibrates them against HEMNMA), and so are the angle network's orientation candidates
(`_dhAngleCandidate<j>*`, where the hybrid starts from).
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pandas as pd

from .files import InputError, atomic_path, require_file
from .gather import MIN_GROUP, WARN_SHARE, robust_z
from .io import (
    AGREEMENT_COLUMN,
    DRIFT_COLUMNS,
    FLAG_COLUMN,
    candidate_columns,
    candidate_numbers,
    read_star,
    uncertainty_column,
    unflagged,
    write_star,
)
from .quality import param_of

log = logging.getLogger(__name__)


def source_column(param: str) -> str:
    return f"dhSource{param.capitalize()}"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="all particles (STAR)")
    p.add_argument("--inferred", nargs="+", required=True, help="STARs from infer")
    p.add_argument("--labelled", default=None, help="STAR of the HEMNMA-labelled images")
    p.add_argument("--quality", default=None, help="quality.json: untrusted networks fall back")
    p.add_argument(
        "--flag-z",
        type=float,
        default=3.0,
        help="flag network-answered images whose disagreement with the model at the answers "
        "has a robust z-score above this (baseline: the HEMNMA-aligned images)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="split CSV: the agreement's baseline is the validation and test images",
    )
    p.add_argument("--out", required=True, help="merged STAR (network/deephemnma.star)")
    p.add_argument("--out-md", default=None, help="what is trusted and why (Markdown)")


def agreement_baseline(
    parts: pd.DataFrame, explained: pd.Series, split: str | None, labelled: pd.DataFrame
) -> tuple[np.ndarray | None, str]:
    """The rows whose agreement is the baseline, and why there is none: the HEMNMA-aligned images
    the quality flag does not mark (`explained`) that the networks did not train on (`split`'s
    val and test sets), or all of them when those are fewer than MIN_GROUP. None with the
    agreement of several references (it measures the first one only) or too few images."""
    if AGREEMENT_COLUMN not in parts:
        return None, "no agreement column (from infer --model)"
    if "dhReference" in labelled and labelled["dhReference"].nunique() > 1:
        return None, "several references: the agreement measures the first one only"
    rows = explained.to_numpy()
    if split:
        sets = pd.read_csv(require_file(split, "split CSV")).set_index("rlnImageName")["set"]
        held_out = parts["rlnImageName"].map(sets).isin(["val", "test"]).to_numpy() & rows
        if held_out.sum() >= MIN_GROUP:
            return held_out, ""
    if rows.sum() < MIN_GROUP:
        return None, f"fewer than {MIN_GROUP} unflagged HEMNMA-aligned images to compare with"
    return rows, ""


def main(args: argparse.Namespace) -> None:
    """All particles with the inferred columns replacing theirs, joined on rlnImageName."""
    base = read_star(require_file(args.particles, "particle STAR"), ["rlnImageName"])
    parts = base["particles"].copy()
    verdicts = {}
    if args.quality:
        report = json.loads(require_file(args.quality, "quality JSON").read_text(encoding="utf-8"))
        verdicts = {r["param"]: r["trusted"] for r in report["networks"]}
    has = pd.Series(False, index=parts.index)  # images HEMNMA aligned
    flagged = pd.Series(False, index=parts.index)  # by HEMNMA's quality flag
    if args.labelled:
        labelled = read_star(require_file(args.labelled, "HEMNMA STAR"), ["rlnImageName"])
        labelled = labelled["particles"].set_index("rlnImageName")
        has = parts["rlnImageName"].isin(labelled.index)
        parts["dhHemnmaLabelled"] = has.astype(int)
        flag = pd.Series(~unflagged(labelled), index=labelled.index)
        flagged = parts["rlnImageName"].map(flag).fillna(False).astype(bool)
    trusted = ~flagged
    lines = []
    for path in args.inferred:
        inferred = read_star(require_file(path, "inferred STAR"), ["rlnImageName"])["particles"]
        cols = [c for c in inferred.columns if c != "rlnImageName"]
        param = param_of(inferred)
        merged = parts[["rlnImageName"]].merge(inferred, on="rlnImageName", how="left")
        if merged[cols].isna().any().any():
            raise InputError(f"{path}: does not cover every particle of {args.particles}")
        parts[cols] = merged[cols].to_numpy()
        parts[source_column(param)] = "network"
        kept = {uncertainty_column(param), AGREEMENT_COLUMN, *DRIFT_COLUMNS.values()}
        kept |= {c for j in candidate_numbers(inferred, path) for c in candidate_columns(j)}
        values = [c for c in cols if c not in kept]
        if has.any():
            names = parts.loc[has, "rlnImageName"]
            parts.loc[has, values] = labelled.loc[names, values].to_numpy()
            parts.loc[has, source_column(param)] = "hemnma"
        if not verdicts.get(param, True):
            trusted &= has
            lines.append(
                f"- ❌ {param}: the network is not trusted: HEMNMA's values for the {int(has.sum())} "
                f"images it aligned; the other {int((~has).sum())} are marked untrusted."
            )
    answered, n = ~has, int((~has).sum())
    baseline, why = agreement_baseline(
        parts, has & ~flagged, args.split, labelled if args.labelled else parts
    )
    if n and baseline is None:
        lines.append(f"- networks: their answers are not checked against the model ({why}).")
    elif n:
        # high when the answers explain the image far worse than the baseline's images
        disagreement = -parts[AGREEMENT_COLUMN].to_numpy(float)
        z = robust_z(disagreement, disagreement[baseline])
        parts["dhAgreementZ"] = z
        poor = answered & (z > args.flag_z)
        flagged |= poor
        trusted &= ~poor
        bad = int(poor.sum())
        lines.append(
            f"- {'⚠️' if bad > WARN_SHARE * n else '✅'} networks: {bad} of the {n} images they "
            "answered are explained by the model at those answers far worse than the held-out "
            "images HEMNMA aligned (robust z-score of the disagreement above "
            f"{args.flag_z:g}, `_dhFlagged 1`): wrong answers, or images the model does not "
            "explain; marked untrusted."
        )
    if args.labelled:
        parts[FLAG_COLUMN] = flagged.astype(int)
        hemnma_flagged = int((flagged & has).sum())
        lines.append(
            f"- HEMNMA: {hemnma_flagged} of the {int(has.sum())} images it aligned "
            "are flagged (the model does not explain them): marked untrusted."
        )
        if n and hemnma_flagged > WARN_SHARE * has.sum():
            lines.append(
                f"- ⚠️ networks: as HEMNMA's images suggest, about {hemnma_flagged / has.sum():.0%} "
                f"of the {n} images the networks answered may show what the model does not "
                "explain, and the agreement test catches only some of them: turn on the hybrid "
                "(`hybrid.enabled`), which refines each and judges it by its cost."
            )
    parts["dhTrusted"] = trusted.astype(int)
    lines.append(f"- {int(trusted.sum())} of {len(parts)} images trusted (`_dhTrusted 1`).")
    write_star(args.out, base["optics"], parts)
    for line in lines:
        log.info(line[2:])
    if args.out_md:
        with atomic_path(args.out_md) as tmp:
            tmp.write_text("# Trust after merging\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
