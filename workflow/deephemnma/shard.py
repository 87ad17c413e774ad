"""shard: pick the (sub)set of particles that HEMNMA aligns and split it into shard STARs."""

from __future__ import annotations

import argparse
import logging

import numpy as np

from .files import InputError, require_file
from .io import read_star, write_star

log = logging.getLogger(__name__)


def shard_rows(n: int, subset: int | None, n_shards: int, seed: int) -> list[np.ndarray]:
    """Row indices of each shard: a seeded random subset (sorted), cut into near-equal parts.

    InputError if the subset is larger than n or a shard would be empty.
    """
    size = n if subset is None else subset
    if size > n:
        raise InputError(f"a subset of {subset} is more than the {n} particles")
    if size < n_shards:
        raise InputError(f"{size} particles for {n_shards} shards (some would be empty)")
    rows = np.arange(n)
    if size < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return np.array_split(rows, n_shards)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="particle STAR")
    p.add_argument("--subset", type=int, default=None, help="random subset size (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the subset")
    p.add_argument("--out", nargs="+", required=True, help="one output STAR per shard")


def main(args: argparse.Namespace) -> None:
    blocks = read_star(require_file(args.particles, "particle STAR"), required=["rlnImageName"])
    parts = blocks["particles"]
    try:
        shards = shard_rows(len(parts), args.subset, len(args.out), args.seed)
    except InputError as exc:
        raise InputError(f"{args.particles}: {exc}") from exc
    for path, rows in zip(args.out, shards, strict=True):
        write_star(path, blocks["optics"], parts.iloc[rows].reset_index(drop=True))
    log.info("split the particles (%d) into %d shards", len(parts), len(args.out))
