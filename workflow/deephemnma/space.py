"""space: conformational space of all images (PCA of amplitudes), groups and trajectories.

PCA of the normal-mode amplitudes of every image (network estimates, or HEMNMA's); density-coloured
2D and 3D scatter plots; groups picked by boxes on the principal axes or by k-means; for each group
a STAR of its images and the atomic model at its centroid; trajectories along PC1 and PC2 (inverse
PCA -> amplitudes -> deformed models) as multi-model PDB files for ChimeraX/VMD.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .io import (
    InputError,
    amplitude_column,
    amplitude_modes,
    atomic_path,
    load_modes,
    pyplot,
    read_star,
    require_file,
    save_figure,
    write_star,
)
from .model import read_structure, write_pdb
from .nma import deform

log = logging.getLogger(__name__)


@dataclass
class PCA:
    """Principal axes of an (n, K) amplitude set: coords = (x - mean) @ components.T."""

    mean: np.ndarray  # (K,)
    components: np.ndarray  # (P, K), rows unit-norm, by decreasing variance
    variance: np.ndarray  # (P,)

    @classmethod
    def fit(cls, x: np.ndarray) -> PCA:
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        vt *= np.where(vt[np.arange(len(vt)), np.abs(vt).argmax(1)] < 0, -1.0, 1.0)[:, None]
        return cls(mean, vt, s**2 / max(len(x) - 1, 1))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components.T

    def inverse(self, coords: np.ndarray) -> np.ndarray:
        return coords @ self.components + self.mean

    @property
    def explained(self) -> np.ndarray:
        return self.variance / self.variance.sum()


def kmeans_groups(coords: np.ndarray, n_groups: int, seed: int = 0) -> np.ndarray:
    """k-means labels (0..n_groups-1), ordered by the groups' PC1 centroid."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit(coords)
    order = np.argsort(np.argsort(km.cluster_centers_[:, 0]))
    return order[km.labels_]


def box_groups(coords: np.ndarray, boxes: list[dict]) -> np.ndarray:
    """Group index of the first box (pc1 and pc2 ranges) holding each point, -1 if none."""
    labels = np.full(len(coords), -1)
    for g, box in reversed(list(enumerate(boxes))):
        (a, b), (c, d) = box["pc1"], box["pc2"]
        inside = (
            (coords[:, 0] >= a) & (coords[:, 0] <= b) & (coords[:, 1] >= c) & (coords[:, 1] <= d)
        )
        labels[inside] = g
    return labels


def scatter_figures(
    coords: np.ndarray, labels: np.ndarray, pca: PCA, path2d: Path, path3d: Path
) -> None:
    """Density-coloured PC1/PC2 map (hexbin, readable for 10⁶ points) and a 3D scatter."""
    plt = pyplot()

    ev = pca.explained
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.3))
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    hb = a1.hexbin(coords[:, 0], y, gridsize=50, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=a1, label="images (log)")
    a1.set_xlabel(f"PC1 ({ev[0]:.0%})")
    a1.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "")
    a1.set_title(f"{len(coords)} images")
    for g in np.unique(labels[labels >= 0]):
        sel = labels == g
        a2.scatter(coords[sel, 0], y[sel], s=3, alpha=0.5, label=f"group {g}")
    a2.set_xlabel("PC1")
    a2.set_ylabel("PC2")
    a2.legend(markerscale=4, fontsize=8)
    a2.set_title("groups")
    fig.tight_layout()
    save_figure(fig, path2d, dpi=100)
    fig = plt.figure(figsize=(5.5, 5))
    ax = fig.add_subplot(projection="3d")
    pick = np.random.default_rng(0).permutation(len(coords))[:20000]
    c3 = np.pad(coords, ((0, 0), (0, max(0, 3 - coords.shape[1]))))[pick]
    ax.scatter(c3[:, 0], c3[:, 1], c3[:, 2], c=c3[:, 0], s=2, cmap="viridis")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_zlabel("PC3")
    fig.tight_layout()
    save_figure(fig, path3d, dpi=100)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--particles", required=True, help="STAR with _dhAmplitudeMode<k> for all images"
    )
    p.add_argument("--modes", required=True, help="modes.npz")
    p.add_argument("--pdb", required=True, help="model PDB (atom names for the output models)")
    p.add_argument("--method", choices=["kmeans", "boxes"], default="kmeans")
    p.add_argument("--n-groups", type=int, default=3)
    p.add_argument("--boxes", default="[]", help='JSON list of {"pc1": [lo, hi], "pc2": [lo, hi]}')
    p.add_argument("--frames", type=int, default=11)
    p.add_argument("--span-std", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--untrusted",
        choices=["exclude", "keep"],
        default="exclude",
        help="images marked _dhTrusted 0 by merge (default: %(default)s)",
    )
    p.add_argument("--out-dir", required=True)


def main(args: argparse.Namespace) -> None:
    blocks = read_star(require_file(args.particles, "particle STAR"), ["rlnImageName"])
    parts = blocks["particles"]
    if args.untrusted == "exclude" and "dhTrusted" in parts:
        keep = parts["dhTrusted"].astype(int) == 1
        log.warning(
            "%d of %d images have estimates from an untrusted network: left out of the space",
            int((~keep).sum()), len(parts),
        )  # fmt: skip
        parts = parts[keep].reset_index(drop=True)
        if len(parts) < 2:
            raise InputError(f"{args.particles}: fewer than 2 trusted images to analyse")
    modes_npz = load_modes(args.modes)
    numbers = [int(k) for k in modes_npz["mode_numbers"]]
    if amplitude_modes(parts) != numbers:
        raise InputError(
            f"{args.particles}: amplitude columns {amplitude_modes(parts)} do not match "
            f"the modes {numbers} of {args.modes}"
        )
    amps = parts[[amplitude_column(k) for k in numbers]].to_numpy(np.float64)
    if not np.isfinite(amps).all():
        raise InputError(f"{args.particles}: amplitudes contain NaN or Inf")
    pca = PCA.fit(amps)
    coords = pca.transform(amps)
    if args.method == "kmeans":
        labels = kmeans_groups(coords, args.n_groups, args.seed)
        n_groups = args.n_groups
    else:
        boxes = json.loads(args.boxes)
        labels, n_groups = box_groups(coords, boxes), len(boxes)
    out = Path(args.out_dir)
    with atomic_path(out / "pca.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            mean=pca.mean,
            components=pca.components,
            variance=pca.variance,
            explained=pca.explained,
            coords=coords,
            labels=labels,
        )
    table = pd.DataFrame({"rlnImageName": parts["rlnImageName"], "group": labels})
    for j in range(coords.shape[1]):
        table[f"PC{j + 1}"] = coords[:, j]
    with atomic_path(out / "space.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    scatter_figures(coords, labels, pca, out / "pca.png", out / "pca3d.png")
    atoms = read_structure(args.pdb)
    x0, vecs = modes_npz["coords"], modes_npz["modes"]
    summary = []
    for g in range(n_groups):
        sel = labels == g
        if not sel.any():
            raise InputError(f"group {g} is empty: adjust the boxes or the number of groups")
        write_star(out / f"group_{g}.star", blocks["optics"], parts[sel].reset_index(drop=True))
        centroid = amps[sel].mean(0)
        write_pdb(out / f"group_{g}_centroid.pdb", atoms, deform(x0, vecs, centroid)[None])
        summary.append(
            {
                "group": g,
                "images": int(sel.sum()),
                **{f"centroid_mode{k}": c for k, c in zip(numbers, centroid, strict=True)},
            }
        )
    with atomic_path(out / "groups.csv") as tmp:
        pd.DataFrame(summary).to_csv(tmp, index=False, float_format="%.3f")
    t = np.linspace(-args.span_std, args.span_std, args.frames)
    for axis in range(min(2, coords.shape[1])):
        pts = np.zeros((args.frames, coords.shape[1]))
        pts[:, axis] = t * np.sqrt(pca.variance[axis])
        frames = np.stack([deform(x0, vecs, a) for a in pca.inverse(pts)])
        write_pdb(out / f"trajectory_pc{axis + 1}.pdb", atoms, frames)
    log.info(
        "PCA explained variance %s; groups %s",
        np.round(pca.explained, 3),
        np.bincount(labels[labels >= 0], minlength=n_groups).tolist(),
    )
