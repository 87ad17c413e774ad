"""split: seeded train / validation / test lists over the labelled images.

Images HEMNMA's quality flag marks (`_dhFlagged 1`: the model does not explain them, so their
labels are wrong) are in none of the three sets: their set is `flagged`."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from .files import InputError, atomic_path, require_file
from .io import read_star, unflagged

log = logging.getLogger(__name__)


def count(n: int, value: float) -> int:
    """A size given as a count (>= 1) or a fraction of n (< 1)."""
    return int(value) if value >= 1 else int(round(value * n))


def split_sizes(n: int, n_val: float, n_test: float) -> tuple[int, int]:
    """(validation, test) sizes for n items; InputError unless one validation and one training
    item remain."""
    nv, nt = count(n, n_val), count(n, n_test)
    if nv + nt >= n or nv < 1:
        raise InputError(
            f"cannot split {n} labelled images into {nv} validation, {nt} test and "
            "at least one training image"
        )
    return nv, nt


def split_sets(n: int, n_val: float, n_test: float, seed: int) -> np.ndarray:
    """Array of 'train' / 'val' / 'test' labels for n items (a seeded permutation)."""
    nv, nt = split_sizes(n, n_val, n_test)
    perm = np.random.default_rng(seed).permutation(n)
    sets = np.full(n, "train", dtype=object)
    sets[perm[:nt]] = "test"
    sets[perm[nt : nt + nv]] = "val"
    return sets


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="labelled particle STAR (HEMNMA or truth)")
    p.add_argument(
        "--n-val",
        type=float,
        default=0.15,
        help="validation images: a count, or a fraction when < 1",
    )
    p.add_argument(
        "--n-test", type=float, default=0.1, help="test images: a count, or a fraction when < 1"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="CSV: rlnImageName, set")


def main(args: argparse.Namespace) -> None:
    parts = read_star(require_file(args.labels, "label STAR"), ["rlnImageName"])["particles"]
    keep = unflagged(parts)
    if (~keep).any():
        log.warning(
            "%d of %d labelled images are flagged by HEMNMA (the model does not explain them): "
            "left out of training, validation and test", int((~keep).sum()), len(parts),
        )  # fmt: skip
    sets = np.full(len(parts), "flagged", dtype=object)
    try:
        sets[keep] = split_sets(int(keep.sum()), args.n_val, args.n_test, args.seed)
    except InputError as exc:
        if keep.all():
            raise
        raise InputError(
            f"{args.labels}: {exc} ({int((~keep).sum())} of {len(parts)} labelled images are "
            "flagged by HEMNMA: see hemnma/verdict.md)"
        ) from exc
    table = pd.DataFrame({"rlnImageName": parts["rlnImageName"], "set": sets})
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("split: %s", table["set"].value_counts().to_dict())
