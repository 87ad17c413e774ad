"""evaluate: the seed's accuracy tables on the test images when ground truth exists.

Rows: network vs ground truth, HEMNMA vs ground truth, network vs HEMNMA. Columns: angular
distance (degrees), |amplitude error| per mode and shift error (pixels), mean and standard
deviation. Also overlap scatter plots of inferred / HEMNMA amplitudes against the truth (seed
Figure S2). Tables are joined on rlnImageName, never on row order.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import geometry
from .io import InputError, amplitude_column, amplitude_modes, atomic_path, read_star, require_file

log = logging.getLogger(__name__)
EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGIN = ["rlnOriginXAngst", "rlnOriginYAngst"]


def compare(a: pd.DataFrame, b: pd.DataFrame, modes: list[int], pixel_size: float) -> dict:
    """Mean and std of the differences between two estimate tables aligned row by row."""
    row = {}
    ang = geometry.euler_distance_deg(a[EULER].to_numpy(float), b[EULER].to_numpy(float))
    row["angle_mean_deg"], row["angle_std_deg"] = ang.mean(), ang.std()
    for k in modes:
        err = np.abs(
            a[amplitude_column(k)].to_numpy(float) - b[amplitude_column(k)].to_numpy(float)
        )
        row[f"mode{k}_mean"], row[f"mode{k}_std"] = err.mean(), err.std()
    row["amplitude_mean_over_modes"] = np.mean([row[f"mode{k}_mean"] for k in modes])
    sh = np.linalg.norm(a[ORIGIN].to_numpy(float) - b[ORIGIN].to_numpy(float), axis=1) / pixel_size
    row["shift_mean_px"], row["shift_std_px"] = sh.mean(), sh.std()
    return row


def evaluation_table(
    truth: pd.DataFrame,
    network: pd.DataFrame,
    hemnma: pd.DataFrame | None,
    names: pd.Series,
    pixel_size: float,
) -> pd.DataFrame:
    """The comparison table on the images `names`."""
    modes = amplitude_modes(truth)
    pick = lambda t: t.set_index("rlnImageName").loc[names.to_numpy()].reset_index()
    t, n = pick(truth), pick(network)
    rows = {"network vs ground truth": compare(n, t, modes, pixel_size)}
    if hemnma is not None:
        h = pick(hemnma)
        rows["HEMNMA vs ground truth"] = compare(h, t, modes, pixel_size)
        rows["network vs HEMNMA"] = compare(n, h, modes, pixel_size)
    table = pd.DataFrame(rows).T
    table.index.name = "comparison"
    return table


def markdown(table: pd.DataFrame, n: int) -> str:
    """The table as Markdown, like the seed's Tables 1 and S1-S2."""
    cols = list(table.columns)
    lines = [
        f"Test images: {n}",
        "",
        "| comparison | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in table.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def overlap_figure(
    truth: pd.DataFrame, others: dict[str, pd.DataFrame], modes: list[int], path: Path
) -> None:
    """Scatter of estimated vs true amplitudes per mode (seed Figure S2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(others), len(modes), figsize=(3.2 * len(modes), 3.2 * len(others)), squeeze=False
    )
    for r, (label, est) in enumerate(others.items()):
        for c, k in enumerate(modes):
            ax = axes[r, c]
            x, y = truth[amplitude_column(k)], est[amplitude_column(k)]
            ax.scatter(x, y, s=4, alpha=0.5)
            lim = [min(x.min(), y.min()), max(x.max(), y.max())]
            ax.plot(lim, lim, color="k", lw=0.8)
            ax.set_xlabel(f"true amplitude, mode {k}")
            ax.set_ylabel(f"{label}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, help="simulated particles.star (ground truth)")
    p.add_argument("--network", required=True, help="deephemnma.star")
    p.add_argument("--hemnma", default=None, help="hemnma.star")
    p.add_argument("--split", required=True, help="split CSV (test images are evaluated)")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-figure", required=True)


def main(args: argparse.Namespace) -> None:
    truth_b = read_star(require_file(args.truth, "truth STAR"), ["rlnImageName", *EULER])
    truth = truth_b["particles"]
    if not amplitude_modes(truth):
        raise InputError(f"{args.truth}: no _dhAmplitudeMode<k> ground-truth columns")
    pixel_size = float(truth_b["optics"]["rlnImagePixelSize"].iloc[0])
    network = read_star(require_file(args.network, "network STAR"), ["rlnImageName"])["particles"]
    hemnma = read_star(args.hemnma, ["rlnImageName"])["particles"] if args.hemnma else None
    split = pd.read_csv(require_file(args.split, "split CSV"))
    names = split.loc[split["set"] == "test", "rlnImageName"]
    if names.empty:
        names = split["rlnImageName"]
        log.warning("no test images in the split: evaluating on all labelled images")
    table = evaluation_table(truth, network, hemnma, names, pixel_size)
    with atomic_path(args.out_csv) as tmp:
        table.to_csv(tmp, float_format="%.4f")
    with atomic_path(args.out_md) as tmp:
        tmp.write_text(markdown(table, len(names)))
    log.info("evaluation on %d test images:\n%s", len(names), markdown(table, len(names)))
    modes = amplitude_modes(truth)
    sel = lambda t: t.set_index("rlnImageName").loc[names.to_numpy()].reset_index()
    others = {"network": sel(network)}
    if hemnma is not None:
        others["HEMNMA"] = sel(hemnma)
    overlap_figure(sel(truth), others, modes, Path(args.out_figure))
