"""merge: all particles with the network estimates of every parameter type, one RELION STAR."""

from __future__ import annotations

import argparse
import logging

from .io import InputError, read_star, require_file, write_star

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="all particles (STAR)")
    p.add_argument("--inferred", nargs="+", required=True, help="STARs from infer")
    p.add_argument("--labelled", default=None, help="STAR of the HEMNMA-labelled images")
    p.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> None:
    """All particles with the inferred columns replacing theirs, joined on rlnImageName."""
    base = read_star(require_file(args.particles, "particle STAR"), ["rlnImageName"])
    parts = base["particles"].copy()
    for path in args.inferred:
        inferred = read_star(require_file(path, "inferred STAR"), ["rlnImageName"])["particles"]
        cols = [c for c in inferred.columns if c != "rlnImageName"]
        merged = parts[["rlnImageName"]].merge(inferred, on="rlnImageName", how="left")
        if merged[cols].isna().any().any():
            raise InputError(f"{path}: does not cover every particle of {args.particles}")
        parts[cols] = merged[cols].to_numpy()
    if args.labelled:
        names = read_star(args.labelled, ["rlnImageName"])["particles"]["rlnImageName"]
        parts["dhHemnmaLabelled"] = parts["rlnImageName"].isin(set(names)).astype(int)
    parts["dhSource"] = "deephemnma"
    write_star(args.out, base["optics"], parts)
    log.info("merged %d particles", len(parts))
