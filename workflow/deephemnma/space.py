"""space: conformational space of all images (PCA of amplitudes), groups and trajectories.

PCA of the normal-mode amplitudes of every image (the merged estimates: HEMNMA's where it aligned
the image, a network's elsewhere, each image marked by its source; or HEMNMA's alone);
density-coloured 2D and 3D scatter plots; the free-energy landscape -kT ln(density) on PC1/PC2 and
PC1/PC3; groups picked by k-means or by selections on the principal axes (ranges on any PC, or a
logical expression such as ``PC1 < 0 and (PC2 > 10 or PC3 < -5)``); for each group a STAR of its
images and the atomic model at its centroid; trajectories along PC1 and PC2 and, between two
groups, along the lowest free-energy path (or the straight line) (inverse PCA -> amplitudes ->
deformed models) as multi-model PDB files for ChimeraX/VMD.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .figures import pyplot, save_figure
from .files import InputError, atomic_path, require_file
from .flexible import FlexibleModel
from .io import amplitude_column, amplitude_modes, read_star, trusted, write_star
from .model import read_structure, write_pdb

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


def pc_table(coords: np.ndarray) -> pd.DataFrame:
    """PC coordinates as columns PC1, PC2, ..."""
    return pd.DataFrame(coords, columns=[f"PC{j + 1}" for j in range(coords.shape[1])])


def in_box(coords: np.ndarray, box: dict) -> np.ndarray:
    """Points inside a selection: every `pc<k>` range [lo, hi] and the `where` expression."""
    inside = np.ones(len(coords), dtype=bool)
    for key, value in box.items():
        if key == "where":
            try:
                inside &= pc_table(coords).eval(value).to_numpy(bool)
            except Exception as exc:
                raise InputError(f"selection '{value}': {exc}") from exc
            continue
        axis = int(key[2:]) - 1
        if not key.startswith("pc") or not 0 <= axis < coords.shape[1]:
            raise InputError(f"selection key '{key}': not one of pc1..pc{coords.shape[1]}")
        lo, hi = value
        inside &= (coords[:, axis] >= lo) & (coords[:, axis] <= hi)
    return inside


def box_groups(coords: np.ndarray, boxes: list[dict]) -> np.ndarray:
    """Group index of the first selection (see in_box) holding each point, -1 if none."""
    labels = np.full(len(coords), -1)
    for g, box in reversed(list(enumerate(boxes))):
        labels[in_box(coords, box)] = g
    return labels


@dataclass
class FreeEnergy:
    """-ln(density / max density) in kT on a 2D grid of two PC axes (NaN where no image is)."""

    axes: tuple[int, int]  # 0-based PC indices
    edges: tuple[np.ndarray, np.ndarray]  # bin edges along each axis (bins + 1,)
    counts: np.ndarray  # (bins, bins) images per bin, [i along axes[0], j along axes[1]]
    energy: np.ndarray  # (bins, bins) free energy in kT, 0 at the most populated bin

    @property
    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(0.5 * (e[1:] + e[:-1]) for e in self.edges)


def free_energy(
    coords: np.ndarray, axes: tuple[int, int], bins: int = 40, smooth: float = 1.0
) -> FreeEnergy:
    """Free-energy landscape -kT ln(p) of the images on PC axes `axes`.

    p is the 2D histogram (at most `bins` per axis, fewer for few images: √(n/4), at least 8)
    smoothed by a Gaussian of `smooth` bins; F is NaN where p < 10⁻³ of its maximum.
    """
    from scipy.ndimage import gaussian_filter

    bins = min(bins, max(8, int(np.sqrt(len(coords) / 4))))
    counts, ex, ey = np.histogram2d(coords[:, axes[0]], coords[:, axes[1]], bins=bins)
    density = gaussian_filter(counts, smooth, mode="constant") if smooth > 0 else counts
    with np.errstate(divide="ignore"):
        energy = -np.log(density / density.max())
    energy[density < 1e-3 * density.max()] = np.nan
    return FreeEnergy(axes, (ex, ey), counts, energy)


def low_energy_path(fe: FreeEnergy, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(M, 2) points from `start` to `end` (PC coordinates on fe.axes) through low free energy.

    Dijkstra over the 8-connected grid; a step costs its length times (1 + F) at the bin it
    enters, F in kT above the minimum (empty bins: the highest F + 2). Ends are snapped to bins.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import dijkstra

    f = np.where(np.isnan(fe.energy), np.nanmax(fe.energy) + 2.0, fe.energy)
    nx, ny = f.shape
    (cx, cy), width = fe.centres, np.array([np.diff(e)[0] for e in fe.edges])
    idx = np.arange(nx * ny).reshape(nx, ny)
    rows, cols, cost = [], [], []
    for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):
        i0, i1 = max(0, -di), nx - max(0, di)
        j0, j1 = max(0, -dj), ny - max(0, dj)
        a = idx[i0:i1, j0:j1]
        b = idx[i0 + di : i1 + di, j0 + dj : j1 + dj]
        step = np.hypot(di * width[0], dj * width[1])
        rows += [a.ravel(), b.ravel()]
        cols += [b.ravel(), a.ravel()]
        cost += [step * (1 + f.ravel()[b.ravel()]), step * (1 + f.ravel()[a.ravel()])]
    graph = coo_array(
        (np.concatenate(cost), (np.concatenate(rows), np.concatenate(cols))), shape=(nx * ny,) * 2
    ).tocsr()

    def node(p: np.ndarray) -> int:
        i = np.clip(np.searchsorted(fe.edges[0], p[0]) - 1, 0, nx - 1)
        j = np.clip(np.searchsorted(fe.edges[1], p[1]) - 1, 0, ny - 1)
        return int(idx[i, j])

    source, target = node(start), node(end)
    _, pred = dijkstra(graph, indices=source, return_predecessors=True)
    nodes = [target]
    while nodes[-1] != source:
        nodes.append(int(pred[nodes[-1]]))
    nodes = np.array(nodes[::-1])
    pts = np.stack([cx[nodes // ny], cy[nodes % ny]], 1)
    return np.vstack([start, pts[1:-1], end]) if len(pts) > 2 else np.stack([start, end])


def resample(points: np.ndarray, n: int) -> np.ndarray:
    """`n` points evenly spaced by arc length along a polyline (M, D)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, points[:, d]) for d in range(points.shape[1])], 1)


def group_path(
    coords: np.ndarray,
    labels: np.ndarray,
    groups: tuple[int, int],
    frames: int,
    method: str,
    fe: FreeEnergy | None,
) -> np.ndarray:
    """(frames, P) PC coordinates from the centroid of group a to that of group b.

    `method` 'free_energy' follows low_energy_path on fe's axes (the other PCs interpolated by
    arc length); 'line' (or no landscape) is the straight line.
    """
    a, b = (coords[labels == g].mean(0) for g in groups)
    if method == "line" or fe is None:
        return resample(np.stack([a, b]), frames)
    ax = list(fe.axes)
    plane = low_energy_path(fe, a[ax], b[ax])
    full = np.repeat(a[None], len(plane), 0)
    seg = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(plane, axis=0), axis=1))])
    t = seg / seg[-1] if seg[-1] > 0 else np.linspace(0, 1, len(plane))
    full += t[:, None] * (b - a)[None]
    full[:, ax] = plane
    return resample(full, frames)


def scatter_figures(
    coords: np.ndarray,
    labels: np.ndarray,
    source: np.ndarray,
    pca: PCA,
    path2d: Path,
    path3d: Path,
) -> None:
    """Density-coloured PC1/PC2 map (hexbin, readable for 10⁶ points), the groups with each
    image's source (hemnma: circles, network: crosses, hybrid: triangles), and a 3D scatter."""
    plt = pyplot()

    ev = pca.explained
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.3))
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    hb = a1.hexbin(coords[:, 0], y, gridsize=50, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=a1, label="images (log)")
    a1.set_xlabel(f"PC1 ({ev[0]:.0%})")
    a1.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "")
    counts = ", ".join(f"{n} {k}" for k, n in pd.Series(source).value_counts().items())
    a1.set_title(f"{len(coords)} images ({counts})", fontsize=10)
    markers = {"hemnma": "o", "network": "x", "hybrid": "^"}
    for g in np.unique(labels[labels >= 0]):
        colour = f"C{g % 10}"
        for src in np.unique(source):
            sel = (labels == g) & (source == src)
            a2.scatter(
                coords[sel, 0], y[sel], s=6, alpha=0.6, c=colour, marker=markers.get(src, "."),
                linewidths=0.6, label=f"group {g}, {src}",
            )  # fmt: skip
    a2.set_xlabel("PC1")
    a2.set_ylabel("PC2")
    a2.legend(markerscale=2, fontsize=7)
    a2.set_title("groups, by source of the amplitudes", fontsize=10)
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


def free_energy_figure(
    landscapes: list[FreeEnergy],
    coords: np.ndarray,
    labels: np.ndarray,
    path: np.ndarray | None,
    out: Path,
) -> None:
    """Each landscape with the groups (outline and centroid) and the path between two groups."""
    from scipy.spatial import ConvexHull

    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(landscapes), figsize=(5.2 * len(landscapes), 4.3), squeeze=False
    )
    for ax, fe in zip(axes[0], landscapes, strict=True):
        i, j = fe.axes
        mesh = ax.pcolormesh(*fe.edges, fe.energy.T, cmap="magma_r", shading="flat")
        fig.colorbar(mesh, ax=ax, label="free energy (kT)")
        for g in np.unique(labels[labels >= 0]):
            pts = coords[labels == g][:, [i, j]]
            if len(pts) >= 3 and np.linalg.matrix_rank(pts - pts.mean(0)) == 2:
                hull = pts[ConvexHull(pts).vertices]
                ax.fill(hull[:, 0], hull[:, 1], fill=False, ec=f"C{g % 10}", lw=1.2)
            c = pts.mean(0)
            ax.plot(*c, "o", c=f"C{g % 10}", mec="k")
            ax.annotate(f"group {g}", c, xytext=(4, 4), textcoords="offset points", fontsize=8)
        if path is not None:
            ax.plot(path[:, i], path[:, j], "-", c="cyan", lw=1.5, label="path")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"PC{i + 1}")
        ax.set_ylabel(f"PC{j + 1}")
        ax.set_title(f"-kT ln(density), PC{i + 1}/PC{j + 1}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, dpi=100)


def free_energy_table(landscapes: list[FreeEnergy]) -> pd.DataFrame:
    """One row per bin with images or a free energy: plane, bin centre, images, free energy."""
    rows = []
    for fe in landscapes:
        (cx, cy), (i, j) = fe.centres, fe.axes
        ii, jj = np.nonzero((fe.counts > 0) | np.isfinite(fe.energy))
        rows.append(
            pd.DataFrame(
                {
                    "plane": f"PC{i + 1}/PC{j + 1}",
                    "x": cx[ii],
                    "y": cy[jj],
                    "images": fe.counts[ii, jj].astype(int),
                    "free_energy_kT": fe.energy[ii, jj],
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--particles", required=True, help="STAR with _dhAmplitudeMode<k> for all images"
    )
    p.add_argument("--modes", required=True, help="modes.npz")
    p.add_argument("--pdb", required=True, help="model PDB (atom names for the output models)")
    p.add_argument(
        "--method", choices=["kmeans", "boxes"], default="kmeans", help="how groups are picked"
    )
    p.add_argument("--n-groups", type=int, default=3, help="k-means groups")
    p.add_argument(
        "--boxes",
        default="[]",
        help='JSON list of selections: {"pc1": [lo, hi], "pc3": [lo, hi], "where": "PC1 < 0 or PC2 > 5"}',
    )
    p.add_argument("--frames", type=int, default=11, help="frames per trajectory")
    p.add_argument(
        "--span-std",
        type=float,
        default=2.0,
        help="trajectories span ± this many standard deviations of the PC",
    )
    p.add_argument("--bins", type=int, default=40, help="free-energy histogram bins per axis")
    p.add_argument(
        "--path-groups", type=int, nargs=2, default=None, help="trajectory between these groups"
    )
    p.add_argument(
        "--path-method",
        choices=["free_energy", "line"],
        default="free_energy",
        help="path between two groups: through low free energy, or a straight line",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of k-means")
    p.add_argument(
        "--untrusted",
        choices=["exclude", "keep"],
        default="exclude",
        help="images marked _dhTrusted 0 by merge or _dhFlagged 1 by gather (default: %(default)s)",
    )
    p.add_argument(
        "--out-dir", required=True, help="folder for the space's tables, figures and models"
    )


def amplitude_source(parts: pd.DataFrame) -> np.ndarray:
    """Where each image's amplitudes come from: merge's _dhSourceAmplitudes, else the whole
    file's kind (HEMNMA's STAR has a _dhCost column)."""
    if "dhSourceAmplitudes" in parts:
        return parts["dhSourceAmplitudes"].astype(str).to_numpy()
    return np.full(len(parts), "hemnma" if "dhCost" in parts else "network")


def trusted_rows(parts: pd.DataFrame, untrusted: str, star: str) -> pd.DataFrame:
    """The particle rows the space is built from: with `untrusted` exclude, those merge marked
    `_dhTrusted` 1 and HEMNMA's quality flag did not mark (InputError naming `star` when fewer
    than 2 are left)."""
    if untrusted != "exclude":
        return parts
    keep = trusted(parts)
    if keep.all():
        return parts
    log.warning(
        "%d of %d images are not trusted (values from an untrusted network, or not explained by "
        "the model): left out of the space", int((~keep).sum()), len(parts),
    )  # fmt: skip
    parts = parts[keep].reset_index(drop=True)
    if len(parts) < 2:
        raise InputError(f"{star}: fewer than 2 trusted images to analyse")
    return parts


def read_amplitudes(parts: pd.DataFrame, numbers: list[int], star: str, modes: str) -> np.ndarray:
    """Amplitudes (B, K) of the modes `numbers`; InputError when the STAR's amplitude columns are
    other modes' or hold NaN/Inf."""
    if amplitude_modes(parts) != numbers:
        raise InputError(
            f"{star}: amplitude columns {amplitude_modes(parts)} do not match "
            f"the modes {numbers} of {modes}"
        )
    amps = parts[[amplitude_column(k) for k in numbers]].to_numpy(np.float64)
    if not np.isfinite(amps).all():
        raise InputError(f"{star}: amplitudes contain NaN or Inf")
    return amps


def pick_groups(coords: np.ndarray, args: argparse.Namespace) -> tuple[np.ndarray, int]:
    """(label per image, number of groups) by k-means or the boxes; InputError for an empty
    group or path groups that do not exist."""
    if args.method == "kmeans":
        labels = kmeans_groups(coords, args.n_groups, args.seed)
        n_groups = args.n_groups
    else:
        boxes = json.loads(args.boxes)
        labels, n_groups = box_groups(coords, boxes), len(boxes)
    empty = [g for g in range(n_groups) if not (labels == g).any()]
    if empty:
        raise InputError(f"group {empty[0]} is empty: adjust the boxes or the number of groups")
    if args.path_groups is not None:
        a, b = args.path_groups
        if max(a, b) >= n_groups or min(a, b) < 0:
            raise InputError(f"path between groups {a} and {b}: there are {n_groups} groups")
        if a == b:
            raise InputError(f"path between groups {a} and {b}: two different groups needed")
    return labels, n_groups


def write_pca(out: Path, pca: PCA, coords: np.ndarray, labels: np.ndarray) -> None:
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


def write_space_table(
    out: Path, names: pd.Series, labels: np.ndarray, source: np.ndarray, coords: np.ndarray
) -> None:
    table = pd.concat(
        [pd.DataFrame({"rlnImageName": names, "group": labels, "source": pd.Categorical(source)}),
         pc_table(coords)], axis=1,
    )  # fmt: skip
    with atomic_path(out / "space.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")


def write_groups(
    out: Path,
    optics: pd.DataFrame | None,
    parts: pd.DataFrame,
    labels: np.ndarray,
    n_groups: int,
    amps: np.ndarray,
    source: np.ndarray,
    model: FlexibleModel,
    atoms,
) -> None:
    """Each group's STAR and centroid model (PDB), and groups.csv (sizes by source, centroids)."""
    numbers = [int(k) for k in model.mode_numbers]
    summary = []
    for g in range(n_groups):
        sel = labels == g
        write_star(out / f"group_{g}.star", optics, parts[sel])
        centroid = amps[sel].mean(0)
        write_pdb(out / f"group_{g}_centroid.pdb", atoms, model.deform(centroid)[None])
        summary.append(
            {
                "group": g,
                "images": int(sel.sum()),
                **{
                    f"images_{k}": int((source[sel] == k).sum())
                    for k in ("hemnma", "network", "hybrid")
                },
                **{f"centroid_mode{k}": c for k, c in zip(numbers, centroid, strict=True)},
            }
        )
    with atomic_path(out / "groups.csv") as tmp:
        pd.DataFrame(summary).to_csv(tmp, index=False, float_format="%.3f")


def write_pc_trajectories(
    out: Path, pca: PCA, n_pcs: int, model: FlexibleModel, atoms, args: argparse.Namespace
) -> None:
    """trajectory_pc{1,2}.pdb: models along PC1 and PC2 over ± `span_std` standard deviations."""
    t = np.linspace(-args.span_std, args.span_std, args.frames)
    for axis in range(min(2, n_pcs)):
        pts = np.zeros((args.frames, n_pcs))
        pts[:, axis] = t * np.sqrt(pca.variance[axis])
        frames = np.stack([model.deform(a) for a in pca.inverse(pts)])
        write_pdb(out / f"trajectory_pc{axis + 1}.pdb", atoms, frames)


def write_group_path(
    out: Path,
    pca: PCA,
    work: np.ndarray,
    labels: np.ndarray,
    fe: FreeEnergy,
    model: FlexibleModel,
    atoms,
    args: argparse.Namespace,
) -> np.ndarray:
    """The trajectory between the two `path_groups` (PDB, and its PCs and free energy per frame
    as CSV); returns the path (frames, ≥ 2) on the working PCs."""
    a, b = args.path_groups
    n_pcs = len(pca.variance)
    path = group_path(work, labels, (a, b), args.frames, args.path_method, fe)
    pcs = path[:, :n_pcs]
    frames = np.stack([model.deform(q) for q in pca.inverse(pcs)])
    write_pdb(out / "trajectory_path.pdb", atoms, frames)
    along = pc_table(pcs)
    i = np.clip(np.searchsorted(fe.edges[0], path[:, 0]) - 1, 0, fe.energy.shape[0] - 1)
    j = np.clip(np.searchsorted(fe.edges[1], path[:, 1]) - 1, 0, fe.energy.shape[1] - 1)
    along["free_energy_kT"] = fe.energy[i, j]
    with atomic_path(out / "trajectory_path.csv") as tmp:
        along.to_csv(tmp, index_label="frame", float_format="%.4f")
    log.info(
        "trajectory between groups %d and %d (%s): %d frames", a, b, args.path_method, args.frames
    )
    return path


def main(args: argparse.Namespace) -> None:
    blocks = read_star(require_file(args.particles, "particle STAR"), ["rlnImageName"])
    # the full table is let go once the trusted rows are taken: one copy in memory, not two
    parts = trusted_rows(blocks.pop("particles"), args.untrusted, args.particles)
    model = FlexibleModel.from_modes(args.modes)
    numbers = [int(k) for k in model.mode_numbers]
    amps = read_amplitudes(parts, numbers, args.particles, args.modes)
    source = amplitude_source(parts)
    pca = PCA.fit(amps)
    coords = pca.transform(amps)
    labels, n_groups = pick_groups(coords, args)
    out = Path(args.out_dir)
    write_pca(out, pca, coords, labels)
    write_space_table(out, parts["rlnImageName"], labels, source, coords)
    scatter_figures(coords, labels, source, pca, out / "pca.png", out / "pca3d.png")
    # the landscapes and the path on PC1/PC2 (and PC1/PC3); with one mode, PC1 against zero
    work = coords if coords.shape[1] > 1 else np.pad(coords, ((0, 0), (0, 1)))
    planes = [(0, j) for j in (1, 2) if j < work.shape[1]]
    landscapes = [free_energy(work, plane, args.bins) for plane in planes]
    with atomic_path(out / "free_energy.csv") as tmp:
        free_energy_table(landscapes).to_csv(tmp, index=False, float_format="%.4f")
    atoms = read_structure(args.pdb)
    write_groups(out, blocks["optics"], parts, labels, n_groups, amps, source, model, atoms)
    write_pc_trajectories(out, pca, coords.shape[1], model, atoms, args)
    path = None
    if args.path_groups is not None:
        path = write_group_path(out, pca, work, labels, landscapes[0], model, atoms, args)
    free_energy_figure(landscapes, work, labels, path, out / "free_energy.png")
    log.info(
        "PCA explained variance %s; groups %s; amplitudes from %s",
        np.round(pca.explained, 3),
        np.bincount(labels[labels >= 0], minlength=n_groups).tolist(),
        pd.Series(source).value_counts().to_dict(),
    )
