"""evaluate: the paper's accuracy tables on the test images when ground truth exists.

Rows: network vs ground truth, HEMNMA vs ground truth, network vs HEMNMA. Columns: angular
distance (degrees), |amplitude error| per mode and shift error (pixels), mean and standard
deviation. Also overlap scatter plots of inferred / HEMNMA amplitudes against the truth (paper
Figure S2). Tables are joined on rlnImageName, never on row order.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import geometry
from .figures import pyplot, save_figure
from .files import InputError, atomic_path, require_file
from .io import (
    EULER_COLUMNS,
    POSE_COLUMNS,
    amplitude_column,
    amplitude_modes,
    read_star,
    table_euler,
    table_shifts_px,
    trusted,
)

log = logging.getLogger(__name__)


def compare(a: pd.DataFrame, b: pd.DataFrame, modes: list[int], pixel_size: float) -> dict:
    """Mean and std of the differences between two estimate tables aligned row by row."""
    row = {}
    ang = geometry.euler_distance_deg(table_euler(a), table_euler(b))
    row["angle_mean_deg"], row["angle_std_deg"] = ang.mean(), ang.std()
    for k in modes:
        err = np.abs(
            a[amplitude_column(k)].to_numpy(float) - b[amplitude_column(k)].to_numpy(float)
        )
        row[f"mode{k}_mean"], row[f"mode{k}_std"] = err.mean(), err.std()
    row["amplitude_mean_over_modes"] = np.mean([row[f"mode{k}_mean"] for k in modes])
    d = table_shifts_px(a, pixel_size) - table_shifts_px(b, pixel_size)
    sh = np.linalg.norm(d, axis=1)
    row["shift_mean_px"], row["shift_std_px"] = sh.mean(), sh.std()
    return row


def evaluation_table(
    truth: pd.DataFrame,
    network: pd.DataFrame,
    hemnma: pd.DataFrame | None,
    test: pd.Series,
    pixel_size: float,
    final: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Comparison table. The network is judged on the test images; HEMNMA (not trained) on every
    image it aligned; network vs HEMNMA on the test images HEMNMA aligned; the final values (the
    STAR the space uses: merged, HEMNMA's or the hybrid's) on every trusted image. Joined on
    names."""
    modes = amplitude_modes(truth)
    t, n = truth.set_index("rlnImageName"), network.set_index("rlnImageName")

    def row(a: pd.DataFrame, b: pd.DataFrame, names) -> dict:
        names = [x for x in names if x in a.index and x in b.index]
        if not names:
            return {}
        return {"images": len(names), **compare(a.loc[names], b.loc[names], modes, pixel_size)}

    rows = {"network vs ground truth": row(n, t, test)}
    if hemnma is not None:
        h = hemnma.set_index("rlnImageName")
        rows["HEMNMA vs ground truth"] = row(h, t, h.index)
        rows["network vs HEMNMA"] = row(n, h, test)
    if final is not None:
        f = final.set_index("rlnImageName")
        f = f[trusted(f)]
        rows["final (trusted images) vs ground truth"] = row(f, t, f.index)
    table = pd.DataFrame({k: v for k, v in rows.items() if v}).T
    table.index.name = "comparison"
    return table


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, like the paper's Tables 1 and S1-S2."""
    cols = list(table.columns)
    lines = ["| comparison | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.iterrows():
        cells = [f"{int(v)}" if c == "images" else f"{v:.2f}" for c, v in row.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def overlap_figure(
    truth: pd.DataFrame,
    others: dict[str, tuple[pd.DataFrame, pd.Series]],
    modes: list[int],
    path: Path,
) -> None:
    """Scatter of estimated vs true amplitudes per mode (paper Figure S2); truth indexed by name."""
    plt = pyplot()

    fig, axes = plt.subplots(
        len(others), len(modes), squeeze=False, figsize=(3.2 * len(modes), 3.2 * len(others))
    )
    for r, (label, (est, names)) in enumerate(others.items()):
        est = est.set_index("rlnImageName").loc[list(names)]
        for c, k in enumerate(modes):
            ax = axes[r, c]
            x, y = truth.loc[est.index, amplitude_column(k)], est[amplitude_column(k)]
            ax.scatter(x, y, s=4, alpha=0.5)
            lim = [min(x.min(), y.min()), max(x.max(), y.max())]
            ax.plot(lim, lim, color="k", lw=0.8)
            ax.set_xlabel(f"true amplitude, mode {k}")
            ax.set_ylabel(label)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, help="simulated particles.star (ground truth)")
    p.add_argument("--inferred", nargs="+", required=True, help="STARs from infer (the networks)")
    p.add_argument(
        "--final", default=None, help="the STAR the space uses (deephemnma.star, hybrid.star)"
    )
    p.add_argument("--hemnma", default=None, help="hemnma.star")
    p.add_argument("--split", required=True, help="split CSV (test images are evaluated)")
    p.add_argument("--out-csv", required=True, help="accuracy table (CSV)")
    p.add_argument("--out-md", required=True, help="accuracy table (Markdown)")
    p.add_argument("--out-figure", required=True, help="estimated vs true amplitudes (PNG)")


def main(args: argparse.Namespace) -> None:
    truth_b = read_star(require_file(args.truth, "truth STAR"), ["rlnImageName", *EULER_COLUMNS])
    truth = truth_b["particles"]
    if not amplitude_modes(truth):
        raise InputError(f"{args.truth}: no _dhAmplitudeMode<k> ground-truth columns")
    pixel_size = float(truth_b["optics"]["rlnImagePixelSize"].iloc[0])
    network = truth[["rlnImageName"]]
    for path in args.inferred:
        inferred = read_star(require_file(path, "inferred STAR"), ["rlnImageName"])["particles"]
        network = network.merge(inferred, on="rlnImageName", how="left")
    amp_cols = [amplitude_column(k) for k in amplitude_modes(truth)]
    network = network.reindex(columns=["rlnImageName", *POSE_COLUMNS, *amp_cols])  # NaN: no net
    final = read_star(args.final, ["rlnImageName"])["particles"] if args.final else None
    hemnma = read_star(args.hemnma, ["rlnImageName"])["particles"] if args.hemnma else None
    split = pd.read_csv(require_file(args.split, "split CSV"))
    names = split.loc[split["set"] == "test", "rlnImageName"]
    if names.empty:
        names = split["rlnImageName"]
        log.warning("no test images in the split: evaluating on all labelled images")
    table = evaluation_table(truth, network, hemnma, names, pixel_size, final)
    with atomic_path(args.out_csv) as tmp:
        table.to_csv(tmp, float_format="%.4f")
    with atomic_path(args.out_md) as tmp:
        tmp.write_text(markdown(table), encoding="utf-8")
    log.info("evaluation:\n%s", markdown(table))
    modes = amplitude_modes(truth)
    truth_i = truth.set_index("rlnImageName")
    others = {"network (test images)": (network, names)}
    if hemnma is not None:
        others["HEMNMA"] = (hemnma, hemnma["rlnImageName"])
    overlap_figure(truth_i, others, modes, Path(args.out_figure))
