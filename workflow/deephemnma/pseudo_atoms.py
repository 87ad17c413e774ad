"""pseudo-atoms: an EM map -> Gaussian pseudo-atoms that reproduce it to a stated accuracy.

The density above a threshold is split by density-weighted k-means into N regions, one pseudo-atom
at each centroid; every pseudo-atom is an isotropic Gaussian of width `sigma` whose weight is fitted
(non-negative least squares, multiplicative updates) so that the map simulated from the
pseudo-atoms matches the thresholded map. Accuracy, as HEMNMA's map conversion reports it: the
relative error ||V - V'|| / ||V|| and the correlation between the map V (zero below the
threshold) and the simulated one V' (the JSON and the log also give both against the whole map).
N is given, or grown until the relative error reaches a target. The pseudo-atoms are written as
a PDB (CA atoms of residue PSE, occupancy = relative weight, mean 1) that prepare-model reads
like any structure.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import prody

from .figures import pyplot, save_figure
from .files import InputError, atomic_path
from .mrc import read_mrc, write_mrc

log = logging.getLogger(__name__)

RESNAME = "PSE"  # residue name that marks pseudo-atoms


@dataclass
class PseudoAtoms:
    """Pseudo-atoms of a map: centres (N, 3) in Å (x, y, z; voxel 0 at the origin), weights (N,)
    on the map's density scale, Gaussian width `sigma` (Å), and their fit to the map."""

    coords: np.ndarray
    weights: np.ndarray
    sigma: float
    correlation: float
    relative_error: float


def voxel_size(path) -> float:
    """Voxel size (Å) of an MRC map from its header: the pseudo-atoms' default width."""
    import mrcfile

    from .files import require_file
    from .mrc import open_mrc

    with open_mrc(require_file(path, "EM map"), partial(mrcfile.open, header_only=True)) as mrc:
        size = float(mrc.voxel_size.x)
    if not size > 0:
        raise InputError(f"{path}: the header's voxel size is {size:g} Å (cell dimensions unset)")
    return size


def default_threshold(density: np.ndarray) -> float:
    """Density threshold when none is given: mean + one standard deviation of the map."""
    return float(density.mean() + density.std())


def gaussians(coords: np.ndarray, shape: tuple[int, int, int], voxel: float, sigma: float):
    """Per-axis Gaussian profiles (gz (N, Z), gy (N, Y), gx (N, X)) of pseudo-atoms at `coords`."""
    out = []
    for axis, size in zip((2, 1, 0), shape, strict=True):
        grid = np.arange(size) * voxel
        out.append(np.exp(-((grid[None] - coords[:, axis : axis + 1]) ** 2) / (2 * sigma**2)))
    return out


def render(coords, weights, shape, voxel: float, sigma: float) -> np.ndarray:
    """The map (Z, Y, X) of Gaussians of peak `weights` at `coords` (Å)."""
    gz, gy, gx = gaussians(coords, shape, voxel, sigma)
    return np.einsum("nz,ny,nx->zyx", gz * weights[:, None], gy, gx, optimize=True)


def project(volume: np.ndarray, coords, voxel: float, sigma: float) -> np.ndarray:
    """(N,) inner products of `volume` with each unit-peak Gaussian (the adjoint of render)."""
    gz, gy, gx = gaussians(coords, volume.shape, voxel, sigma)
    return np.einsum("zyx,nz,ny,nx->n", volume, gz, gy, gx, optimize=True)


def accuracy(target: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    """(correlation, relative error ||target - model|| / ||target||) over the whole box."""
    corr = float(np.corrcoef(target.ravel(), model.ravel())[0, 1])
    return corr, float(np.linalg.norm(target - model) / np.linalg.norm(target))


def place(
    target: np.ndarray,
    voxel: float,
    n_atoms: int,
    sigma: float,
    iterations: int = 60,
    seed: int = 0,
) -> PseudoAtoms:
    """`n_atoms` pseudo-atoms fitted to a thresholded map `target` (zero below the threshold)."""
    from sklearn.cluster import KMeans

    zyx = np.argwhere(target > 0)
    if len(zyx) < n_atoms:
        raise InputError(f"only {len(zyx)} voxels above the threshold; need {n_atoms}")
    xyz = zyx[:, ::-1].astype(np.float64) * voxel
    mass = target[tuple(zyx.T)].astype(np.float64)
    km = KMeans(n_clusters=n_atoms, n_init=1, random_state=seed).fit(xyz, sample_weight=mass)
    coords = km.cluster_centers_
    # start from each region's mass over a unit Gaussian's volume, then NNLS by multiplicative steps
    weights = np.bincount(km.labels_, mass, n_atoms) / ((2 * np.pi) ** 1.5 * (sigma / voxel) ** 3)
    numerator = project(target, coords, voxel, sigma)
    for _ in range(iterations):
        model = render(coords, weights, target.shape, voxel, sigma)
        weights *= numerator / np.maximum(project(model, coords, voxel, sigma), 1e-30)
    model = render(coords, weights, target.shape, voxel, sigma)
    corr, err = accuracy(target, model)
    return PseudoAtoms(coords, weights, sigma, corr, err)


def fit_map(
    density: np.ndarray,
    voxel: float,
    threshold: float | None = None,
    sigma: float | None = None,
    n_atoms: int | None = None,
    target_error: float = 0.15,
    max_atoms: int = 5000,
    seed: int = 0,
) -> tuple[PseudoAtoms, list[PseudoAtoms]]:
    """Pseudo-atoms of `density` (Z, Y, X); the final set and every set tried.

    `sigma` defaults to the voxel size, `threshold` to default_threshold. With `n_atoms` None the
    count starts from the volume above the threshold over a (2 sigma)³ cube and grows by 1.4×
    until the relative error is at most `target_error` (or `max_atoms` is reached: a warning).
    """
    if not np.isfinite(density).all():
        raise InputError("map contains NaN or Inf")
    thr = default_threshold(density) if threshold is None else threshold
    sigma = voxel if sigma is None else sigma
    target = np.where(density > thr, density, 0.0)
    inside = int((target > 0).sum())
    if inside == 0:
        raise InputError(f"no voxel above the threshold {thr:g}")
    if n_atoms is not None:
        fit = place(target, voxel, n_atoms, sigma, seed=seed)
        return fit, [fit]
    n = max(10, int(inside * voxel**3 / (2 * sigma) ** 3))
    tried = []
    while True:
        n = min(n, max_atoms, inside)
        tried.append(place(target, voxel, n, sigma, seed=seed))
        log.info("%d pseudo-atoms: relative error %.3f", n, tried[-1].relative_error)
        if tried[-1].relative_error <= target_error:
            return tried[-1], tried
        if n in (max_atoms, inside):
            log.warning(
                "target relative error %.3f not reached with %d pseudo-atoms (%.3f)",
                target_error, n, tried[-1].relative_error,
            )  # fmt: skip
            return tried[-1], tried
        n = int(np.ceil(1.4 * n))


def to_atoms(fit: PseudoAtoms) -> prody.AtomGroup:
    """Pseudo-atoms as CA atoms of residues PSE (occupancy = weight relative to the mean)."""
    n = len(fit.coords)
    ag = prody.AtomGroup("pseudo-atoms")
    ag.setCoords(fit.coords)
    ag.setNames(["CA"] * n)
    ag.setResnames([RESNAME] * n)
    ag.setResnums(np.arange(1, n + 1))
    ag.setElements(["C"] * n)
    ag.setChids(["A"] * n)
    ag.setSerials(np.arange(1, n + 1))
    ag.setOccupancies(fit.weights / fit.weights.mean())
    return ag


def slices_figure(target: np.ndarray, model: np.ndarray, fit: PseudoAtoms, path) -> None:
    """Central slices of the thresholded map and of the pseudo-atom map, side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    c = [s // 2 for s in target.shape]
    for row, (vol, name) in enumerate(((target, "map"), (model, "pseudo-atoms"))):
        for col, (cut, axis) in enumerate(
            ((vol[c[0]], "z"), (vol[:, c[1]], "y"), (vol[:, :, c[2]], "x"))
        ):
            axes[row, col].imshow(cut, cmap="gray", origin="lower")
            axes[row, col].set_title(f"{name}, central {axis} slice", fontsize=9)
            axes[row, col].axis("off")
    fig.suptitle(
        f"{len(fit.coords)} pseudo-atoms, σ {fit.sigma:.2f} Å: correlation "
        f"{fit.correlation:.3f}, relative error {fit.relative_error:.3f}"
    )
    fig.tight_layout()
    save_figure(fig, path)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", required=True, help="EM map (.mrc/.map)")
    p.add_argument("--threshold", type=float, default=None, help="default: mean + 1 std")
    p.add_argument(
        "--sigma", type=float, default=None, help="Gaussian width (Å; default: the voxel size)"
    )
    p.add_argument("--n-atoms", type=int, default=None, help="default: grow to --target-error")
    p.add_argument("--target-error", type=float, default=0.15, help="relative error to reach")
    p.add_argument(
        "--max-atoms", type=int, default=5000, help="stop growing at this many pseudo-atoms"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-pdb", required=True, help="pseudo-atoms (PDB)")
    p.add_argument("--out-map", required=True, help="the map simulated from the pseudo-atoms")
    p.add_argument("--out-table", required=True, help="CSV: count, correlation, error per try")
    p.add_argument("--out-json", required=True, help="count, correlation and relative error (JSON)")
    p.add_argument("--out-figure", required=True, help="accuracy per try (PNG)")


def main(args: argparse.Namespace) -> None:
    density, voxel = read_mrc(args.map)
    if density.ndim != 3 or min(density.shape) < 2:
        raise InputError(f"{args.map}: not a 3D map (shape {density.shape})")
    if not args.target_error > 0:
        raise InputError(f"--target-error {args.target_error:g}: must be positive")
    if not voxel > 0:
        raise InputError(
            f"{args.map}: the header's voxel size is {voxel:g} Å (cell dimensions unset)"
        )
    if args.sigma is not None and not args.sigma > 0:
        raise InputError(f"--sigma {args.sigma:g}: must be positive")
    if args.n_atoms is not None and args.n_atoms < 1:
        raise InputError(f"--n-atoms {args.n_atoms}: must be at least 1")
    density = density.astype(np.float64)
    try:
        fit, tried = fit_map(
            density, voxel, args.threshold, args.sigma, args.n_atoms, args.target_error,
            args.max_atoms, args.seed,
        )  # fmt: skip
    except InputError as exc:
        raise InputError(f"{args.map}: {exc}") from exc
    thr = default_threshold(density) if args.threshold is None else args.threshold
    target = np.where(density > thr, density, 0.0)
    model = render(fit.coords, fit.weights, density.shape, voxel, fit.sigma)
    whole = accuracy(density, model)  # against the map as given, below the threshold too
    with atomic_path(args.out_pdb) as tmp:
        prody.writePDB(str(tmp), to_atoms(fit))
    write_mrc(args.out_map, model, voxel)
    rows = [
        {
            "pseudo_atoms": len(t.coords),
            "correlation": t.correlation,
            "relative_error": t.relative_error,
        }
        for t in tried
    ]
    with atomic_path(args.out_table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.4f")
    summary = {
        "map": str(args.map),
        "voxel_size": voxel,
        "threshold": thr,
        "sigma_angstrom": fit.sigma,
        "pseudo_atoms": len(fit.coords),
        "correlation": fit.correlation,
        "relative_error": fit.relative_error,
        "target_error": None if args.n_atoms else args.target_error,
        "correlation_whole_map": whole[0],
        "relative_error_whole_map": whole[1],
    }
    with atomic_path(args.out_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    slices_figure(target, model, fit, args.out_figure)
    log.info(
        "%d pseudo-atoms (σ %.2f Å) reproduce %s above %.4g: correlation %.4f, relative error %.4f "
        "(whole map, below the threshold too: correlation %.4f, relative error %.4f)",
        len(fit.coords), fit.sigma, args.map, thr, fit.correlation, fit.relative_error, *whole,
    )  # fmt: skip
