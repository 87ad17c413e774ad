"""gather: merge the aligned HEMNMA shards into one STAR, with a per-image quality flag.

An image whose cost is far above the population's (robust z-score `dhCostZ` from the median and
MAD, per reference when there are several) is one the model does not explain: `dhFlagged` = 1.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from .io import InputError, pyplot, read_star, save_figure, write_star

log = logging.getLogger(__name__)


def robust_z(cost: np.ndarray) -> np.ndarray:
    """(cost - median) / (1.4826 · MAD): a z-score that outliers do not inflate."""
    cost = np.asarray(cost, dtype=np.float64)
    if len(cost) == 0:
        return cost
    med = np.median(cost)
    mad = 1.4826 * np.median(np.abs(cost - med))
    return (cost - med) / max(mad, 1e-12)


def cost_z(parts: pd.DataFrame) -> np.ndarray:
    """Robust z-score of `dhCost`, per `dhReference` when the column exists."""
    if "dhReference" not in parts:
        return robust_z(parts["dhCost"].to_numpy())
    z = np.zeros(len(parts))
    for _, rows in parts.groupby("dhReference").indices.items():
        z[rows] = robust_z(parts["dhCost"].to_numpy()[rows])
    return z


def cost_figure(cost: pd.Series, flagged: pd.Series, path: str) -> None:
    """Histogram of the HEMNMA cost (1 - normalised correlation) per image, flagged in red."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.histogram_bin_edges(cost, bins=40)
    ax.hist(cost[~flagged], bins=bins, color="tab:blue", label="explained")
    ax.hist(cost[flagged], bins=bins, color="tab:red", label=f"flagged ({int(flagged.sum())})")
    ax.set_xlabel("HEMNMA cost (1 - normalised correlation)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="+", required=True, help="aligned HEMNMA shard STARs")
    p.add_argument("--out", required=True, help="gathered HEMNMA STAR")
    p.add_argument("--out-figure", required=True, help="cost histogram (PNG)")
    p.add_argument(
        "--flag-z",
        type=float,
        default=3.0,
        help="flag images whose cost robust z-score exceeds this",
    )


def main(args: argparse.Namespace) -> None:
    blocks = [read_star(s, required=["rlnImageName", "dhCost"]) for s in args.shards]
    optics = blocks[0]["optics"]
    for s, b in zip(args.shards, blocks, strict=True):
        if not b["optics"].equals(optics):
            raise InputError(f"{s}: optics table differs from {args.shards[0]}")
    parts = pd.concat([b["particles"] for b in blocks], ignore_index=True)
    parts["dhCostZ"] = cost_z(parts)
    parts["dhFlagged"] = (parts["dhCostZ"] > args.flag_z).astype(int)
    write_star(args.out, optics, parts)
    cost_figure(parts["dhCost"], parts["dhFlagged"].astype(bool), args.out_figure)
    log.info("gathered %d aligned particles from %d shards", len(parts), len(args.shards))
    log.info(
        "flagged %d of %d images (cost robust z > %g): the model does not explain them",
        int(parts["dhFlagged"].sum()),
        len(parts),
        args.flag_z,
    )
