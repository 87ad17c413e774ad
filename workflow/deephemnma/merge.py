"""merge: all particles with the estimates of every parameter type, one RELION STAR.

Images HEMNMA aligned keep HEMNMA's values (more accurate than any network's); the others take
each parameter type from its network, and are marked untrusted (`_dhTrusted 0`) when a network
they depend on failed its verdict (`deephemnma quality`). Images HEMNMA's quality flag marks (the
model does not explain them) keep their `_dhFlagged 1` and are marked untrusted too. The column `_dhSource<Type>` says where
each value came from (network | hemnma). A network's `_dhUncertainty<Type>` and the networks'
`_dhModelAgreement` are kept on every row, HEMNMA-aligned ones included (there they are what
calibrates them against HEMNMA), and so are the angle network's orientation candidates
(`_dhAngleCandidate<j>*`, where the hybrid starts from).
"""

from __future__ import annotations

import argparse
import json
import logging

import pandas as pd

from .files import InputError, require_file
from .io import (
    AGREEMENT_COLUMN,
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
    p.add_argument("--out", required=True, help="merged STAR (network/deephemnma.star)")


def main(args: argparse.Namespace) -> None:
    """All particles with the inferred columns replacing theirs, joined on rlnImageName."""
    base = read_star(require_file(args.particles, "particle STAR"), ["rlnImageName"])
    parts = base["particles"].copy()
    verdicts = {}
    if args.quality:
        report = json.loads(require_file(args.quality, "quality JSON").read_text())
        verdicts = {r["param"]: r["trusted"] for r in report["networks"]}
    has = pd.Series(False, index=parts.index)  # images HEMNMA aligned
    if args.labelled:
        labelled = read_star(require_file(args.labelled, "HEMNMA STAR"), ["rlnImageName"])
        labelled = labelled["particles"].set_index("rlnImageName")
        has = parts["rlnImageName"].isin(labelled.index)
        parts["dhHemnmaLabelled"] = has.astype(int)
    trusted = pd.Series(True, index=parts.index)
    for path in args.inferred:
        inferred = read_star(require_file(path, "inferred STAR"), ["rlnImageName"])["particles"]
        cols = [c for c in inferred.columns if c != "rlnImageName"]
        param = param_of(inferred)
        merged = parts[["rlnImageName"]].merge(inferred, on="rlnImageName", how="left")
        if merged[cols].isna().any().any():
            raise InputError(f"{path}: does not cover every particle of {args.particles}")
        parts[cols] = merged[cols].to_numpy()
        parts[source_column(param)] = "network"
        kept = {uncertainty_column(param), AGREEMENT_COLUMN}
        kept |= {c for j in candidate_numbers(inferred, path) for c in candidate_columns(j)}
        values = [c for c in cols if c not in kept]
        if has.any():
            names = parts.loc[has, "rlnImageName"]
            parts.loc[has, values] = labelled.loc[names, values].to_numpy()
            parts.loc[has, source_column(param)] = "hemnma"
        if not verdicts.get(param, True):
            trusted &= has
            log.warning(
                "%s: network not trusted; HEMNMA values for %d images, %d images marked untrusted",
                param, int(has.sum()), int((~has).sum()),
            )  # fmt: skip
    if args.labelled and FLAG_COLUMN in labelled:
        flag = pd.Series(~unflagged(labelled), index=labelled.index)
        flagged = parts["rlnImageName"].map(flag).fillna(False).astype(bool)
        parts[FLAG_COLUMN] = flagged.astype(int)
        trusted &= ~flagged
        if flagged.any():
            log.warning(
                "%d HEMNMA-aligned images are flagged (the model does not explain them): "
                "marked untrusted", int(flagged.sum()),
            )  # fmt: skip
    parts["dhTrusted"] = trusted.astype(int)
    write_star(args.out, base["optics"], parts)
    log.info("merged %d particles, %d trusted", len(parts), int(trusted.sum()))
