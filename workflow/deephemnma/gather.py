"""gather: merge the aligned HEMNMA shards into one STAR, with a figure of the per-image cost."""

from __future__ import annotations

import argparse
import logging

import pandas as pd

from .io import InputError, pyplot, read_star, save_figure, write_star

log = logging.getLogger(__name__)


def cost_figure(cost: pd.Series, path: str) -> None:
    """Histogram of the HEMNMA cost (1 - normalised correlation) per image."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(cost, bins=40, color="tab:blue")
    ax.set_xlabel("HEMNMA cost (1 - normalised correlation)")
    ax.set_ylabel("images")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--out-figure", required=True)


def main(args: argparse.Namespace) -> None:
    blocks = [read_star(s, required=["rlnImageName", "dhCost"]) for s in args.shards]
    optics = blocks[0]["optics"]
    for s, b in zip(args.shards, blocks, strict=True):
        if not b["optics"].equals(optics):
            raise InputError(f"{s}: optics table differs from {args.shards[0]}")
    parts = pd.concat([b["particles"] for b in blocks], ignore_index=True)
    write_star(args.out, optics, parts)
    cost_figure(parts["dhCost"], args.out_figure)
    log.info("gathered %d aligned particles from %d shards", len(parts), len(args.shards))
