"""import: a RELION 3.0/3.1 particle STAR + MRCS stacks -> a validated particle set in our format.

Stack paths are resolved as RELION does (against the working directory), then against the STAR's
folder, then against `--datadir` (like cryoDRGN). The images are streamed through (optionally
Fourier-cropped to a working box and normalised on the background outside a circular mask, as
RELION's --particle_diameter) into new stacks; NaN/Inf pixels stop the import with the offending
image named. Existing poses (a consensus refinement) are kept as RELION prior columns
`_rlnAngle{Rot,Tilt,Psi}Prior`, `_rlnOrigin{X,Y}PriorAngst`, which `hemnma --start priors` starts
from; a file with prior columns and no pose keeps its priors.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import imaging
from .files import InputError, require_file
from .io import optics_table, read_star, write_star
from .mrc import ParticleImages, StackWriter

log = logging.getLogger(__name__)

PRIOR = {
    "rlnAngleRot": "rlnAngleRotPrior",
    "rlnAngleTilt": "rlnAngleTiltPrior",
    "rlnAnglePsi": "rlnAnglePsiPrior",
    "rlnOriginXAngst": "rlnOriginXPriorAngst",
    "rlnOriginYAngst": "rlnOriginYPriorAngst",
}
OPTICS_PER_PARTICLE = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]


def particle_table(star: Path) -> pd.DataFrame:
    """The particle table with optics values merged in and RELION 3.0 units converted (Å, Å/px)."""
    blocks = read_star(star, required=["rlnImageName", "rlnDefocusU"])
    parts, optics = blocks["particles"].copy(), blocks["optics"]
    if optics is not None:
        if "rlnOpticsGroup" not in parts:
            raise InputError(f"{star}: particles lack _rlnOpticsGroup but the file has optics")
        parts = parts.merge(optics, on="rlnOpticsGroup", how="left", suffixes=("", "_optics"))
    if "rlnImagePixelSize" not in parts:
        if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(parts):
            parts["rlnImagePixelSize"] = (
                parts["rlnDetectorPixelSize"] * 1e4 / parts["rlnMagnification"]
            )
        else:
            raise InputError(
                f"{star}: no pixel size (_rlnImagePixelSize, or "
                "_rlnDetectorPixelSize with _rlnMagnification)"
            )
    missing = [c for c in OPTICS_PER_PARTICLE if c not in parts]
    if missing:
        raise InputError(f"{star}: missing column(s) {', '.join('_' + c for c in missing)}")
    for axis in "XY":
        for px, angst in ((f"rlnOrigin{axis}", f"rlnOrigin{axis}Angst"),
                          (f"rlnOrigin{axis}Prior", f"rlnOrigin{axis}PriorAngst")):  # fmt: skip
            if px in parts and angst not in parts:  # RELION 3.0: pixels
                parts[angst] = parts[px] * parts["rlnImagePixelSize"]
    parts["rlnDefocusV"] = parts.get("rlnDefocusV", parts["rlnDefocusU"])
    parts["rlnDefocusAngle"] = parts.get("rlnDefocusAngle", 0.0)
    parts["rlnPhaseShift"] = parts.get("rlnPhaseShift", 0.0)
    numeric = ["rlnImagePixelSize", *OPTICS_PER_PARTICLE, "rlnDefocusU", "rlnDefocusV"]
    bad = parts[numeric].isna().any(axis=1)
    if bad.any():
        raise InputError(
            f"{star}: particle {parts['rlnImageName'].iloc[int(np.argmax(bad))]} has "
            "missing optics/CTF values (unknown optics group?)"
        )
    return parts


def normalise(images: torch.Tensor, radius: float) -> torch.Tensor:
    """RELION-style: background (outside `radius` px) to mean 0 and standard deviation 1."""
    bg = ~imaging.circular_mask(images.shape[-1], radius)
    vals = images[:, bg]
    std = vals.std(dim=1)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (images - vals.mean(dim=1)[:, None, None]) / std[:, None, None]


KEPT_COLUMNS = [  # per-particle columns copied to the imported STAR when present
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnMicrographName",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnGroupName",
    "rlnRandomSubset",
]


def input_pixel_size(star: Path, parts: pd.DataFrame) -> float:
    """The particles' one pixel size (Å); InputError when the pixel size or an optics value
    differs between particles."""
    pixel_sizes = parts["rlnImagePixelSize"].unique()
    if len(pixel_sizes) != 1:
        raise InputError(f"{star}: particles have different pixel sizes {sorted(pixel_sizes)}")
    for col in OPTICS_PER_PARTICLE:
        if parts[col].nunique() != 1:
            raise InputError(f"{star}: {col} differs between particles; import one group at a time")
    return float(pixel_sizes[0])


def mask_radius(
    star: Path, box_out: int, px_out: float, mask_diameter: float | None, normalize: bool
) -> float:
    """Radius (working-box pixels) of the normalisation mask: `mask_diameter` Å, default 0.9 of
    the box; InputError when normalising with a mask outside the box."""
    radius = 0.9 * box_out / 2 if mask_diameter is None else mask_diameter / 2 / px_out
    if normalize and not 1 <= radius < box_out / 2:
        raise InputError(
            f"{star}: mask diameter {mask_diameter:g} Å is not within the working box "
            f"({box_out} px of {px_out:.4g} Å: 2 px to {box_out * px_out:.4g} Å, exclusive)"
        )
    if normalize:
        log.info(
            "normalising on the background outside %.4g Å (%.3g px of %d)",
            2 * radius * px_out, radius, box_out,
        )  # fmt: skip
    return radius


def stream_images(
    images: ParticleImages, writer: StackWriter, box_out: int, radius: float | None, batch: int
) -> None:
    """Every image Fourier-cropped to `box_out` (and normalised outside `radius` unless None)
    into `writer`'s stacks; the stacks are removed if anything fails."""
    try:
        for start in tqdm(range(0, len(images), batch), desc="import", unit="batch", mininterval=5):
            rows = np.arange(start, min(start + batch, len(images)))
            imgs = imaging.fourier_crop(torch.from_numpy(images[rows]), box_out)
            if radius is not None:
                imgs = normalise(imgs, radius)
            writer.write(imgs.numpy())
    except BaseException:
        writer.abort()
        raise


def imported_table(parts: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The imported particle table: new image names, CTF and kept columns, amplitude columns
    (`dhAmplitudeMode<k>`, e.g. a simulator's truth), the consensus pose as prior columns, the
    original image name in `dhSourceImageName`. Other `dh*` columns (an earlier run's costs,
    flags, trust, sources) are not carried: this run judges its images afresh."""
    keep = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"]
    keep += [c for c in KEPT_COLUMNS if c in parts]
    keep += [c for c in parts.columns if c.startswith("dhAmplitudeMode")]
    out = parts[keep].copy()
    for col, prior in PRIOR.items():
        if col in parts or prior in parts:
            out[prior] = parts[col if col in parts else prior].to_numpy()
    out.insert(0, "rlnImageName", names)
    out["dhSourceImageName"] = parts["rlnImageName"].to_numpy()
    out["rlnOpticsGroup"] = 1
    return out


def import_particles(
    star: Path,
    datadir: Path | None,
    box: int | None,
    normalize: bool,
    out_star: Path,
    out_stacks: Path,
    per_stack: int,
    batch: int = 256,
    mask_diameter: float | None = None,
) -> pd.DataFrame:
    """Validate, convert and stream a RELION particle set; returns the written particle table.

    `mask_diameter` (Å): normalisation uses the background outside it (default: 0.9 of the box).
    """
    parts = particle_table(star)
    roots = [Path.cwd(), star.resolve().parent] + ([Path(datadir)] if datadir else [])
    images = ParticleImages(parts["rlnImageName"], roots)
    px_in, box_in = input_pixel_size(star, parts), images.box
    box_out = box or box_in
    if box_out > box_in:
        raise InputError(f"{star}: working box {box_out} is larger than the images ({box_in})")
    px_out = px_in * box_in / box_out
    radius = mask_radius(star, box_out, px_out, mask_diameter, normalize)
    writer = StackWriter(out_stacks, len(parts), box_out, px_out, per_stack)
    stream_images(images, writer, box_out, radius if normalize else None, batch)
    first = parts.iloc[0]
    optics = optics_table(
        px_out,
        box_out,
        float(first["rlnVoltage"]),
        float(first["rlnSphericalAberration"]),
        float(first["rlnAmplitudeContrast"]),
    )
    out = imported_table(parts, writer.names)
    write_star(out_star, optics, out)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--star", required=True, help="RELION 3.0/3.1 particle STAR")
    p.add_argument("--datadir", default=None, help="extra root against which stack paths resolve")
    p.add_argument("--box", type=int, default=None, help="Fourier-crop to this box (pixels)")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalise on the background (--no-normalize: keep the pixel values)",
    )
    p.add_argument(
        "--mask-diameter",
        type=float,
        default=None,
        help="particle mask diameter (Å) for the background normalisation (default: 0.9 box)",
    )
    p.add_argument(
        "--images-per-stack", type=int, default=10000, help="images per output MRCS stack"
    )
    p.add_argument("--out-star", required=True, help="imported particle STAR (RELION 3.1)")
    p.add_argument("--out-stacks", required=True, help="folder for the new MRCS stacks")


def main(args: argparse.Namespace) -> None:
    star = require_file(args.star, "particle STAR")
    out = import_particles(
        star,
        args.datadir and Path(args.datadir),
        args.box,
        args.normalize,
        Path(args.out_star),
        Path(args.out_stacks),
        args.images_per_stack,
        mask_diameter=args.mask_diameter,
    )
    log.info("imported %d particles from %s -> %s", len(out), star, args.out_star)
