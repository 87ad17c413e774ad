"""quality: does each network beat its trivial baseline on held-out labelled images?

A network's error on the test images (labelled, never used for training or early stopping) is
compared with the error of the trivial answer learnt from the training labels: their mean for
amplitudes and shifts, the rotation nearest their mean for angles (a constant answer; about 126°
for orientations uniform on SO(3)). With HEMNMA labels this is the network against HEMNMA on
held-out images, the only check real data allow. A network is trusted when its error is at most
`max_ratio` × the baseline's; the verdicts go to quality.json (read by merge) and quality.md
(first in the report), in plain words. Where a network predicts a per-image uncertainty
(`_dhUncertainty<Type>`: angles, amplitudes, shifts), its calibration is measured on the same
images: the Spearman correlation between predicted uncertainty and actual error, and a scatter plot
per network; so is, for every network, the image's disagreement with the model at the networks'
answers (`_dhModelAgreement`, from the amplitude inference with views), and for the shift and
amplitude networks how far a short local refinement of the model moves their answers
(`_dhModel<Type>Drift`): checks real data allow.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from . import geometry
from .figures import pyplot, save_figure
from .files import InputError, atomic_path, require_file
from .io import (
    AGREEMENT_COLUMN,
    DRIFT_COLUMNS,
    EULER_COLUMNS,
    ORIGIN_COLUMNS,
    ParticleSet,
    amplitude_column,
    amplitude_modes,
    read_star,
    table_euler,
    table_shifts_px,
    uncertainty_column,
)

log = logging.getLogger(__name__)
UNITS = {"amplitudes": "amplitude units", "angles": "degrees", "shifts": "pixels"}
UNCERTAINTIES = {
    "amplitudes": "predicted σ, mean over modes (amplitude units)",
    "angles": "predicted mass > 20° from the answer",
    "shifts": "predicted RMS shift error (pixels)",
}


def errors(param: str, est: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
    """Per-image error of estimates against references: angle (degrees), mean |amplitude
    difference| over modes, or shift distance (pixels). Label dicts hold 'euler', 'shifts',
    'amplitudes' arrays with one row per image."""
    if param == "angles":
        return geometry.euler_distance_deg(est["euler"], ref["euler"])
    if param == "shifts":
        return np.linalg.norm(est["shifts"] - ref["shifts"], axis=1)
    return np.abs(est["amplitudes"] - ref["amplitudes"]).mean(1)


def baseline(train: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The trivial constant answer for n images, learnt from training labels."""
    rot = geometry.mean_rotation(geometry.euler_to_matrix(train["euler"]))
    return {
        "euler": np.repeat(geometry.matrix_to_euler(rot)[None], n, 0),
        "shifts": np.repeat(train["shifts"].mean(0, keepdims=True), n, 0),
        "amplitudes": np.repeat(train["amplitudes"].mean(0, keepdims=True), n, 0),
    }


def verdict(param: str, error: float, base: float, max_ratio: float, reference: str) -> dict:
    """One network's verdict as a dict, with a sentence a user can act on."""
    ratio = error / base if base > 0 else float("inf")
    trusted = bool(ratio <= max_ratio)
    unit = UNITS[param]
    if trusted:
        text = (
            f"{param}: the network learned — mean error {error:.3g} {unit} against "
            f"{reference}, {ratio:.2f} × the trivial baseline ({base:.3g})."
        )
    else:
        text = (
            f"{param}: the network did NOT learn enough — mean error {error:.3g} {unit} "
            f"against {reference} is {ratio:.2f} × the trivial baseline ({base:.3g}; trusted "
            f"at ≤ {max_ratio:g} ×). Its values are not used where HEMNMA's exist; images "
            "without HEMNMA values are marked untrusted."
        )
    return {
        "param": param,
        "error": error,
        "baseline": base,
        "ratio": ratio,
        "trusted": trusted,
        "reference": reference,
        "text": text,
    }


def param_of(table: pd.DataFrame) -> str:
    """The parameter type whose columns an inferred table holds."""
    if EULER_COLUMNS[0] in table:
        return "angles"
    return "shifts" if ORIGIN_COLUMNS[0] in table else "amplitudes"


def labels_of(table: pd.DataFrame, pixel_size: float, modes: list[int]) -> dict[str, np.ndarray]:
    """The label arrays a particle table holds (Euler degrees, shifts pixels, amplitudes)."""
    out = {}
    if set(EULER_COLUMNS) <= set(table.columns):
        out["euler"] = table_euler(table)
    if set(ORIGIN_COLUMNS) <= set(table.columns):
        out["shifts"] = table_shifts_px(table, pixel_size)
    amp_cols = [amplitude_column(k) for k in modes]
    if set(amp_cols) <= set(table.columns):
        out["amplitudes"] = table[amp_cols].to_numpy(float)
    return out


def calibration(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation between predicted uncertainty and actual error (NaN if
    either is constant)."""
    if np.ptp(uncertainty) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(uncertainty, error).statistic)


def calibration_figure(points: dict[str, tuple[np.ndarray, np.ndarray]], path: str) -> None:
    """Actual error against predicted uncertainty, one panel per network that predicts one."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(points), 1), figsize=(4.5 * max(len(points), 1), 4))
    for ax, (param, (unc, err)) in zip(np.atleast_1d(axes), points.items(), strict=False):
        ax.scatter(unc, err, s=8, alpha=0.6)
        ax.set_xlabel(UNCERTAINTIES[param])
        ax.set_ylabel(f"error ({UNITS[param]})")
        ax.set_title(f"{param}: Spearman ρ = {calibration(unc, err):.2f}")
    if not points:
        np.atleast_1d(axes)[0].text(0.5, 0.5, "no network predicts an uncertainty", ha="center")
    save_figure(fig, path)


def markdown(rows: list[dict], images: int, which: str) -> str:
    """The verdicts as a Markdown page: sentences first, then the table."""
    lines = ["# Network verdicts", ""]
    lines += [f"- {'✅' if r['trusted'] else '❌'} {r['text']}" for r in rows]
    measures = {
        "spearman": lambda r: "the predicted per-image uncertainty",
        "agreement_spearman": lambda r: (
            "the image's disagreement with the model at the "
            "networks' answers (1 − `_dhModelAgreement`)"
        ),
        "drift_spearman": lambda r: (
            "how far a short local refinement of the model moves the "
            f"answer (`_{DRIFT_COLUMNS[r['param']]}`)"
        ),
    }
    lines += [
        f"- {r['param']}: {what(r)} ranks the actual errors with Spearman ρ = {r[key]:.2f}"
        + (" (1: perfectly; 0: not at all)." if key == "spearman" else ".")
        for key, what in measures.items()
        for r in rows
        if r.get(key) is not None
    ]
    lines += [
        "",
        f"Measured on {images} {which} images. Baseline: the best constant answer learnt "
        "from the training labels.",
        "",
        "| network | mean error | baseline | ratio | trusted |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['param']} | {r['error']:.3g} | {r['baseline']:.3g} | {r['ratio']:.2f} | "
        f"{'yes' if r['trusted'] else 'NO'} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="labelled STAR the networks learnt from")
    p.add_argument("--split", required=True, help="split CSV")
    p.add_argument("--inferred", nargs="+", required=True, help="STARs from infer")
    p.add_argument(
        "--label-source", default="hemnma", choices=["hemnma", "truth"], help="what labels are"
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=0.5,
        help="trusted when error ≤ this × baseline (default: %(default)s)",
    )
    p.add_argument("--out-json", required=True, help="verdicts (JSON)")
    p.add_argument("--out-md", required=True, help="verdicts in plain words (Markdown)")
    p.add_argument("--out-figure", required=True, help="calibration plot (PNG)")


def main(args: argparse.Namespace) -> None:
    ps = ParticleSet(require_file(args.labels, "label STAR"))
    modes = amplitude_modes(ps.particles)
    table = ps.particles.set_index("rlnImageName")
    split = pd.read_csv(require_file(args.split, "split CSV")).set_index("rlnImageName")
    which = "test"
    held_out = split.index[split["set"] == "test"]
    if len(held_out) == 0:
        which, held_out = "validation", split.index[split["set"] == "val"]
    if len(held_out) == 0:
        raise InputError(f"{args.split}: no test or validation images to judge the networks on")
    train_names = split.index[split["set"] == "train"]
    ref = labels_of(table.loc[held_out], ps.pixel_size, modes)
    base = baseline(labels_of(table.loc[train_names], ps.pixel_size, modes), len(held_out))
    reference = "HEMNMA on held-out images" if args.label_source == "hemnma" else "ground truth"
    rows, points, tables = [], {}, {}
    for path in args.inferred:
        inferred = read_star(require_file(path, "inferred STAR"), ["rlnImageName"])["particles"]
        tables[path] = inferred.set_index("rlnImageName")
        missing = held_out.difference(tables[path].index)
        if len(missing):
            raise InputError(f"{path}: no estimate for image {missing[0]}")
    column = lambda c: next((t.loc[held_out, c] for t in tables.values() if c in t), None)
    agree = column(AGREEMENT_COLUMN)
    for inferred in tables.values():
        param = param_of(inferred)
        est = {**ref, **labels_of(inferred.loc[held_out], ps.pixel_size, modes)}
        per_image = errors(param, est, ref)
        b = float(errors(param, base, ref).mean())
        rows.append(verdict(param, float(per_image.mean()), b, args.max_ratio, reference))
        log.info("%s", rows[-1]["text"])
        if uncertainty_column(param) in inferred:
            unc = inferred.loc[held_out, uncertainty_column(param)].to_numpy(float)
            points[param] = (unc, per_image)
            rows[-1]["spearman"] = calibration(unc, per_image)
            log.info("%s: uncertainty calibration Spearman %.2f", param, rows[-1]["spearman"])
        if agree is not None:
            rows[-1]["agreement_spearman"] = calibration(-agree.to_numpy(float), per_image)
            log.info("%s: model agreement Spearman %.2f", param, rows[-1]["agreement_spearman"])
        drift = column(DRIFT_COLUMNS[param]) if param in DRIFT_COLUMNS else None
        if drift is not None:
            rows[-1]["drift_spearman"] = calibration(drift.to_numpy(float), per_image)
            log.info("%s: drift Spearman %.2f", param, rows[-1]["drift_spearman"])
    with atomic_path(args.out_json) as tmp:
        tmp.write_text(
            json.dumps({"images": len(held_out), "set": which, "networks": rows}), encoding="utf-8"
        )
    with atomic_path(args.out_md) as tmp:
        tmp.write_text(markdown(rows, len(held_out), which), encoding="utf-8")
    calibration_figure(points, args.out_figure)
