"""export: a group's particles back to RELION, pointing at the original particle images.

The group STAR written by `space` refers to the working images (imported, possibly Fourier-cropped
to a smaller box). Its rows are matched to the original STAR through `_dhSourceImageName` (the
original `_rlnImageName`, kept by `import`), and the original rows are written with every original
column and the original optics block unchanged, the poses replaced by the estimates: Euler angles
as they are (same convention, any box), origins in Å as they are (the Fourier crop keeps the image
centre, so a shift in Å does not depend on the box) and, where the original has RELION 3.0 pixel
origins `_rlnOriginX/Y`, those too, in pixels of the original images. Our per-particle values
(`_dhAmplitudeMode<k>`, `_dhSource<Type>`, `_dhTrusted`, ...) are added as extra columns, which
RELION carries along. A RELION 3.0 original gets the optics block RELION 3.1 itself would build,
so the output reads in relion_reconstruct / relion_refine (3.1 and later) as it is.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .files import InputError, require_file
from .io import POSE_COLUMNS, optics_table, read_star, write_star
from .relion import particle_table

log = logging.getLogger(__name__)


def original_optics(star: Path, box: int) -> pd.DataFrame:
    """The original optics block (RELION 3.1+); for a RELION 3.0 file, a one-group block from
    its per-particle pixel size, voltage, Cs and amplitude contrast."""
    blocks = read_star(star, ["rlnImageName"])
    if blocks["optics"] is not None:
        return blocks["optics"]
    first = particle_table(star).iloc[0]
    optics = optics_table(
        float(first["rlnImagePixelSize"]),
        box,
        float(first["rlnVoltage"]),
        float(first["rlnSphericalAberration"]),
        float(first["rlnAmplitudeContrast"]),
    ).drop(columns="dhCtf")
    return optics


def export_group(
    group: pd.DataFrame, original: Path, box: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) of the original rows of `group` with its poses (see the module).

    `box` is the original images' size (for a RELION 3.0 original's optics block).
    """
    if "dhSourceImageName" not in group:
        raise InputError("group STAR lacks _dhSourceImageName: it was not made by `import`")
    missing = [c for c in POSE_COLUMNS if c not in group]
    if missing:
        raise InputError(
            f"group STAR lacks the pose column(s) {', '.join('_' + c for c in missing)}"
        )
    raw = read_star(original, ["rlnImageName"])["particles"]
    if raw["rlnImageName"].duplicated().any():
        dup = raw["rlnImageName"][raw["rlnImageName"].duplicated()].iloc[0]
        raise InputError(f"{original}: image {dup} appears twice")
    index = pd.Index(raw["rlnImageName"])
    rows = index.get_indexer(group["dhSourceImageName"])
    if (rows < 0).any():
        name = group["dhSourceImageName"].iloc[int(np.argmin(rows))]
        raise InputError(f"{original}: has no particle {name} (was the group imported from it?)")
    out = raw.iloc[rows].reset_index(drop=True)
    for col in POSE_COLUMNS:
        out[col] = group[col].to_numpy(np.float64)
    pixel_size = particle_table(original)["rlnImagePixelSize"].to_numpy(np.float64)[rows]
    for axis in "XY":
        if f"rlnOrigin{axis}" in raw:  # RELION 3.0 origins, in pixels of the original images
            out[f"rlnOrigin{axis}"] = out[f"rlnOrigin{axis}Angst"] / pixel_size
    ours = [c for c in group.columns if c.startswith("dh") and c != "dhSourceImageName"]
    for col in ours:
        out[col] = group[col].to_numpy()
    optics = original_optics(original, box)
    if "rlnOpticsGroup" not in out:
        out["rlnOpticsGroup"] = 1
    return optics, out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", required=True, help="group STAR from space (working images)")
    p.add_argument("--original", required=True, help="the RELION STAR that was imported")
    p.add_argument("--datadir", default=None, help="extra root for the original stack paths")
    p.add_argument("--out", required=True, help="group STAR for RELION on the original particles")


def main(args: argparse.Namespace) -> None:
    from .io import particle_images

    original = require_file(args.original, "original particle STAR")
    group = read_star(require_file(args.group, "group STAR"), ["rlnImageName"])["particles"]
    raw = read_star(original, ["rlnImageName"])["particles"]
    roots = [Path(args.datadir)] if args.datadir else []
    named = raw[raw["rlnImageName"].isin(group.get("dhSourceImageName", pd.Series(dtype=str)))]
    box = particle_images(original, named if len(named) else raw.iloc[:1], roots).box
    try:
        optics, out = export_group(group, original, box)
    except InputError as exc:
        text = str(exc) if str(exc).startswith(str(original)) else f"{args.group}: {exc}"
        raise InputError(text) from exc
    if "rlnImageSize" in optics and (optics["rlnImageSize"].astype(int) != box).any():
        raise InputError(
            f"{original}: rlnImageSize {optics['rlnImageSize'].tolist()} but the stacks hold "
            f"{box}-pixel images"
        )
    write_star(args.out, optics, out)
    log.info(
        "%d particles of %s exported against %s (%d px, %.4g Å/px)",
        len(out), args.group, original, box, float(optics["rlnImagePixelSize"].iloc[0]),
    )  # fmt: skip
