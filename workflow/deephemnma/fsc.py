"""fsc: Fourier shell correlation of a group's half-maps (0.143) and of its map against a map
simulated from the group's centroid atomic model (0.5 and 0.143), with curves and resolutions."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_fourier_shell_correlation import fourier_shell_correlation

from .figures import pyplot, save_figure
from .files import InputError, atomic_path
from .flexible import load_model
from .imaging import density
from .model import read_structure
from .mrc import read_mrc, write_mrc

log = logging.getLogger(__name__)


def model_map(
    coords: np.ndarray, weights: np.ndarray, box: int, pixel_size: float, sigma_angstrom: float
) -> np.ndarray:
    """Density (D, D, D) [z, y, x] of Gaussian atoms, centre at D // 2 (matches the projector)."""
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    return density(t(coords), t(weights), box, pixel_size, sigma_angstrom).float().numpy()


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC per shell, shells 0 .. D // 2 at frequencies i / D (cycles per voxel)."""
    return fourier_shell_correlation(
        torch.from_numpy(a).double(), torch.from_numpy(b).double()
    ).numpy()


def resolution(curve: np.ndarray, box: int, pixel_size: float, threshold: float) -> float:
    """Resolution (Å) where the FSC first falls below `threshold` (linear interpolation between
    shells); the Nyquist resolution 2 × pixel size if it never does."""
    below = np.nonzero(curve[1:] < threshold)[0]
    if len(below) == 0:
        return 2.0 * pixel_size
    i = below[0] + 1
    f0, f1 = curve[i - 1], curve[i]
    shell = i - 1 + (f0 - threshold) / (f0 - f1) if f0 != f1 else i
    return box * pixel_size / max(shell, 1e-6)


def fsc_figure(table: pd.DataFrame, path: Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(table["frequency"], table["fsc_half_maps"], label="half-maps")
    ax.plot(table["frequency"], table["fsc_model"], label="map vs centroid model")
    ax.axhline(0.143, color="grey", ls="--", lw=0.8)
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--half1", required=True, help="half-map 1 (MRC)")
    p.add_argument("--half2", required=True, help="half-map 2 (MRC)")
    p.add_argument("--map", required=True, help="full map (MRC)")
    p.add_argument("--centroid-pdb", required=True, help="atomic model at the group's centroid")
    p.add_argument("--model", required=True, help="model.npz (scattering weights)")
    p.add_argument(
        "--sigma-angstrom", type=float, default=1.0, help="atom Gaussian width of the model map (Å)"
    )
    p.add_argument("--name", default="group", help="name in the figure and tables")
    p.add_argument(
        "--out-model-map", required=True, help="map simulated from the centroid model (MRC)"
    )
    p.add_argument("--out-csv", required=True, help="FSC curves (CSV)")
    p.add_argument("--out-json", required=True, help="resolutions at 0.5 and 0.143 (JSON)")
    p.add_argument("--out-figure", required=True, help="FSC curves (PNG)")


def main(args: argparse.Namespace) -> None:
    (h1, px), (h2, px2), (full, px3) = (
        read_mrc(args.half1),
        read_mrc(args.half2),
        read_mrc(args.map),
    )
    if not (h1.shape == h2.shape == full.shape and np.isclose(px, px2) and np.isclose(px, px3)):
        raise InputError(
            f"{args.half1}, {args.half2}, {args.map}: maps differ in box or voxel size"
        )
    box = h1.shape[0]
    weights = load_model(args.model)["weights"]
    coords = read_structure(args.centroid_pdb).getCoords()
    if len(coords) != len(weights):
        raise InputError(
            f"{args.centroid_pdb}: {len(coords)} atoms but {args.model} has {len(weights)}"
        )
    ref = model_map(coords, weights, box, px, args.sigma_angstrom)
    write_mrc(args.out_model_map, ref, px)
    half = fsc_curve(h1, h2)
    vs_model = fsc_curve(full, ref)
    freq = np.arange(len(half)) / (box * px)
    table = pd.DataFrame({"frequency": freq, "fsc_half_maps": half, "fsc_model": vs_model})
    with atomic_path(args.out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.5f")
    res = {
        "group": args.name,
        "half_maps_0.143": resolution(half, box, px, 0.143),
        "model_0.5": resolution(vs_model, box, px, 0.5),
        "model_0.143": resolution(vs_model, box, px, 0.143),
        "nyquist": 2 * px,
    }
    with atomic_path(args.out_json) as tmp:
        tmp.write_text(json.dumps(res, indent=1), encoding="utf-8")
    fsc_figure(table, Path(args.out_figure), f"{args.name}: {res['half_maps_0.143']:.1f} Å (0.143)")
    log.info("FSC %s", res)
