"""hybrid: local HEMNMA refinement from the networks' answers (hybrid DeepHEMNMA).

`hybrid select` picks, from the merged STAR, the images without HEMNMA values (all of them, or
with `--select uncertain` the `--fraction` whose network answers are the most uncertain according
to the `_dhUncertainty<Param>` columns) and splits them into shard STARs; `deephemnma hemnma
--start network` refines each shard locally from the pose, shift and amplitude columns it holds;
`hybrid combine` writes the merged STAR with the refined values in place and `_dhSource<Type>`
set to `hybrid` for them (HEMNMA's values stay where HEMNMA labelled the image, the networks'
elsewhere). A refined image is trusted (`_dhTrusted` 1) when HEMNMA's own images show that its
cost is typical: robust z-score of its cost against the costs of the images HEMNMA aligned
(`gather.cost_z`: per reference, as gather's flag) at most `--flag-z`, and flagged
(`_dhFlagged` 1) otherwise;
the refinement repairs an untrusted network's answer when it finds the right basin (orientation
candidates, escalation to the global search), and the cost says when it did not. Without `--hemnma`
`_dhTrusted` is kept from merge.
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import pandas as pd

from .files import InputError, atomic_path, require_file
from .gather import WARN_SHARE, cost_z
from .io import (
    AGREEMENT_COLUMN,
    DRIFT_COLUMNS,
    FLAG_COLUMN,
    POSE_COLUMNS,
    amplitude_modes,
    read_star,
    uncertainty_column,
    write_star,
)
from .merge import source_column
from .shard import shard_rows

log = logging.getLogger(__name__)
PARAMS = ("angles", "shifts", "amplitudes")


def uncertainty_rank(table: pd.DataFrame, path: str) -> np.ndarray:
    """Per image, the largest percentile rank (0-1] of its `_dhUncertainty<Param>` values and of
    its disagreement with the model at the answer (`-_dhModelAgreement`) and its drifts under a
    short local refinement (`_dhModel<Type>Drift`), over those present: high when any of its
    answers is among the most uncertain."""
    cols = [uncertainty_column(p) for p in PARAMS if uncertainty_column(p) in table]
    cols += [c for c in DRIFT_COLUMNS.values() if c in table]
    scores = table[cols].copy()
    if AGREEMENT_COLUMN in table:
        scores[AGREEMENT_COLUMN] = -table[AGREEMENT_COLUMN]
    if not len(scores.columns):
        every = [*map(uncertainty_column, PARAMS), AGREEMENT_COLUMN, *DRIFT_COLUMNS.values()]
        wanted = ", ".join("_" + c for c in every)
        raise InputError(f"{path}: --select uncertain needs column(s) {wanted} (from infer)")
    return scores.rank(pct=True).max(axis=1).to_numpy()


def select_rows(table: pd.DataFrame, select: str, fraction: float, path: str) -> np.ndarray:
    """Row indices (sorted) of the images to refine: those without HEMNMA values, all or the
    `fraction` (rounded up) most uncertain of them."""
    missing = [source_column(p) for p in PARAMS if source_column(p) not in table]
    if missing:
        raise InputError(
            f"{path}: no network answer to start from (missing "
            f"{', '.join('_' + c for c in missing)}): the hybrid needs all three networks"
        )
    rows = np.arange(len(table))
    if "dhHemnmaLabelled" in table:
        rows = rows[table["dhHemnmaLabelled"].to_numpy() == 0]
    if select == "uncertain":
        rank = uncertainty_rank(table.iloc[rows], path)
        n = math.ceil(fraction * len(rows))
        rows = np.sort(rows[np.argsort(-rank, kind="stable")[:n]])
    return rows


def combine(merged: pd.DataFrame, refined: pd.DataFrame, path: str) -> pd.DataFrame:
    """`merged` with the pose, shift and amplitude columns of the `refined` images replaced
    (joined on rlnImageName) and their `_dhSource<Type>` set to `hybrid`."""
    out = merged.copy()
    where = pd.Index(out["rlnImageName"]).get_indexer(refined["rlnImageName"])
    if (where < 0).any():
        name = refined["rlnImageName"].iloc[int(np.argmax(where < 0))]
        raise InputError(f"{path}: image {name} is not in the merged STAR")
    cols = POSE_COLUMNS + [f"dhAmplitudeMode{k}" for k in amplitude_modes(out)]
    lacking = [c for c in cols if c not in refined]
    if lacking:
        raise InputError(f"{path}: missing column(s) {', '.join('_' + c for c in lacking)}")
    out.loc[out.index[where], cols] = refined[cols].to_numpy()
    for p in PARAMS:
        out.loc[out.index[where], source_column(p)] = "hybrid"
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    step = p.add_subparsers(dest="step", required=True, metavar="STEP")
    s = step.add_parser(
        "select", help="images to refine, split into shard STARs", formatter_class=p.formatter_class
    )
    s.add_argument("--merged", required=True, help="merged STAR (merge)")
    s.add_argument(
        "--select",
        choices=["all", "uncertain"],
        default="all",
        help="all images without HEMNMA values, or the most uncertain share of them",
    )
    s.add_argument("--fraction", type=float, default=0.25, help="--select uncertain: this share")
    s.add_argument("--out", nargs="+", required=True, help="one shard STAR per output")
    c = step.add_parser(
        "combine",
        help="the merged STAR with the refined values in place",
        formatter_class=p.formatter_class,
    )
    c.add_argument("--merged", required=True, help="merged STAR (merge)")
    c.add_argument("--refined", nargs="+", required=True, help="shards from hemnma --start network")
    c.add_argument(
        "--hemnma",
        default=None,
        help="HEMNMA's STAR (gather, with _dhCost): refined images whose cost is typical of its "
        "images are trusted, the others not (default: _dhTrusted kept from merge)",
    )
    c.add_argument(
        "--flag-z", type=float, default=3.0, help="with --hemnma: the largest trusted cost z-score"
    )
    c.add_argument(
        "--originals",
        type=int,
        default=None,
        help="with --hemnma: references given by the user (those above: fitted from the first, "
        "measured against its costs)",
    )
    c.add_argument("--out", required=True, help="hybrid STAR")
    c.add_argument("--out-md", default=None, help="the hybrid's verdict in words (Markdown)")


def main(args: argparse.Namespace) -> None:
    blocks = read_star(require_file(args.merged, "merged STAR"), ["rlnImageName"])
    table = blocks["particles"]
    if args.step == "select":
        if not 0 < args.fraction <= 1:
            raise InputError(f"--fraction {args.fraction:g}: must be in (0, 1]")
        rows = select_rows(table, args.select, args.fraction, args.merged)
        try:
            shards = shard_rows(len(rows), None, len(args.out), 0)
        except InputError as exc:
            raise InputError(f"{args.merged}: images to refine: {exc}") from exc
        for path, part in zip(args.out, shards, strict=True):
            write_star(path, blocks["optics"], table.iloc[rows[part]].reset_index(drop=True))
        log.info("%d of %d images to refine (%s)", len(rows), len(table), args.select)
        return
    refined = [read_star(require_file(s, "refined shard"), ["rlnImageName"]) for s in args.refined]
    names = pd.concat([b["particles"]["rlnImageName"] for b in refined])
    if names.duplicated().any():
        raise InputError(f"image {names[names.duplicated()].iloc[0]} is in two refined shards")
    out = table
    for path, b in zip(args.refined, refined, strict=True):
        out = combine(out, b["particles"], path)
    n = sum(len(b["particles"]) for b in refined)
    log.info("hybrid: %d of %d images refined from their network answers", n, len(out))
    verdict = (
        f"- hybrid: {n} of {len(out)} images refined by HEMNMA from the networks' answers; "
        "`_dhTrusted` as merge set it (no HEMNMA costs to compare with)."
    )
    if args.hemnma is not None and n:
        hem = read_star(require_file(args.hemnma, "HEMNMA STAR"), ["rlnImageName", "dhCost"])
        parts = pd.concat([b["particles"] for b in refined])
        if "dhCost" not in parts:
            raise InputError(f"{args.refined[0]}: no _dhCost column (not from hemnma?)")
        trusted = cost_z(parts, hem["particles"], args.originals) <= args.flag_z
        where = pd.Index(out["rlnImageName"]).get_indexer(parts["rlnImageName"])
        out = out.copy()
        out.loc[out.index[where], "dhTrusted"] = trusted.astype(int)
        if FLAG_COLUMN in out:  # the refined values replace the answers merge judged
            out.loc[out.index[where], FLAG_COLUMN] = (~trusted).astype(int)
        good, bad = int(trusted.sum()), int((~trusted).sum())
        log.info(
            "hybrid: %d of %d refined images explained as well as HEMNMA's own (cost z <= %g): "
            "trusted; %d not", good, n, args.flag_z, bad,
        )  # fmt: skip
        verdict = (
            f"- {'✅' if bad <= WARN_SHARE * n else '⚠️'} hybrid: {n} of {len(out)} images refined by "
            f"HEMNMA from the networks' answers; {good} of them are explained as well as HEMNMA "
            f"explains the images it aligned itself (cost robust z-score ≤ {args.flag_z:g}) and "
            f"are trusted; {bad} are not (`_dhTrusted 0`, `_dhFlagged 1`)."
        )
    write_star(args.out, blocks["optics"], out)
    if args.out_md:
        with atomic_path(args.out_md) as tmp:
            tmp.write_text(f"# Hybrid verdict\n\n{verdict}\n", encoding="utf-8")
