"""Local HEMNMA refinement from a given pose against full HEMNMA (reference protocol, reduced).

1. Consensus priors: reference-protocol particles (open AK, modes 7-9 uniform ±150, 1.1 Å/px at
   128 px, CTF, SNR 0.1) aligned by full HEMNMA (global search + refinement) and by local
   refinement from the true pose perturbed by `--perturb-deg` (random axis) and `--perturb-px`
   (random direction), amplitudes starting at zero as from a rigid consensus refinement; then
   from larger perturbations (`--basin`, the basin of convergence). Errors against the truth and
   seconds per image per core (wall × threads / images).
2. Hybrid (with `--results`, a finished simulated workflow run): on its test images, the errors of
   the networks (inferred STARs), of local refinement from the networks' answers (hybrid, with and
   without the 180° in-plane flip candidate) and of HEMNMA, against the truth.

    flock /tmp/heavy.lock python bench/local.py [--n-images 64] [--box 64] [--results results]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hemnma import reference_set  # noqa: E402

from deephemnma import geometry, hemnma, quality  # noqa: E402
from deephemnma.flexible import FlexibleModel  # noqa: E402
from deephemnma.io import ParticleSet, read_star  # noqa: E402

MODES = [7, 8, 9]
LABELS = {"euler": "euler", "shifts_px": "shifts", "amplitudes": "amplitudes"}  # result: label


def perturbed(truth: hemnma.Start, deg: float, px: float, rng: np.random.Generator) -> hemnma.Start:
    """The true pose rotated by `deg` about a random axis and shifted by `px` in a random
    direction; amplitudes zero."""
    n = len(truth.euler)
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    delta = torch.linalg.matrix_exp(hemnma.skew(torch.tensor(axis * np.radians(deg)))).numpy()
    euler = geometry.matrix_to_euler(delta @ geometry.euler_to_matrix(truth.euler))
    phi = rng.uniform(0, 2 * np.pi, n)
    shifts = truth.shifts_px + px * np.stack([np.cos(phi), np.sin(phi)], 1)
    return hemnma.Start(euler, shifts, np.zeros_like(truth.amplitudes))


def timed(ps: ParticleSet, rows: np.ndarray, aligner: hemnma.Aligner, start=None):
    """(result, seconds per image per core) of aligning `rows`."""
    t0 = time.perf_counter()
    res = hemnma.align_rows(ps, rows, aligner, start=start)
    return res, (time.perf_counter() - t0) * torch.get_num_threads() / len(rows)


def errors(res: dict, truth: hemnma.Start) -> tuple[float, float, float, float]:
    """Mean angle error (deg), its median, mean |amplitude error|, mean shift error (px)."""
    ang = geometry.euler_distance_deg(res["euler"], truth.euler)
    amp = np.abs(res["amplitudes"] - truth.amplitudes).mean()
    shift = np.linalg.norm(res["shifts_px"] - truth.shifts_px, axis=1).mean()
    return ang.mean(), np.median(ang), amp, shift


def row(name: str, err, per: float | None) -> str:
    t = "—" if per is None else f"{per:.3f}"
    return f"| {name} | {err[0]:.2f} | {err[1]:.2f} | {err[2]:.1f} | {err[3]:.2f} | {t} |"


HEADER = [
    "| method | angle error mean (°) | median (°) | abs amplitude error | shift error (px) "
    "| s / image / core |",
    "|---|---|---|---|---|---|",
]


def priors_figure(a: argparse.Namespace, settings: hemnma.AlignSettings) -> None:
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        reference_set(d, a.n_images, a.box, noise=True)
        cwd = os.getcwd()
        os.chdir(d)
        try:
            ps = ParticleSet("p.star")
            model = FlexibleModel.load("model.npz", "modes.npz")
            rows = np.arange(len(ps))
            truth = hemnma.Start(ps.euler(), ps.shifts_px(), ps.amplitudes(MODES))
            new = lambda s: hemnma.Aligner(model, ps.box, ps.pixel_size, s, a.device)
            full, t_full = timed(ps, rows, new(settings))
            local = new(replace(settings, start="priors"))
            lines = [row("full HEMNMA (global search + refinement)", errors(full, truth), t_full)]
            for deg, px in [(a.perturb_deg, a.perturb_px)] + [(b, a.perturb_px) for b in a.basin]:
                start = perturbed(truth, deg, px, rng)
                res, per = timed(ps, rows, local, start)
                start_err = errors(vars(start), truth)
                lines.append(row(f"start: truth + {deg:g}° / {px:g} px", start_err, None))
                lines.append(row(f"local from it ({deg:g}° / {px:g} px)", errors(res, truth), per))
        finally:
            os.chdir(cwd)
    print(f"\n1. Local refinement from priors: {a.n_images} images, {a.box} px, CTF + SNR 0.1")
    print("\n".join(HEADER + lines))


def network_start(results: Path, names: pd.Index, pixel_size: float) -> hemnma.Start:
    """The networks' answers for the images `names` from results/network/<param>/inferred.star."""
    table = pd.DataFrame(index=names)
    for param in ("angles", "shifts", "amplitudes"):
        inf = read_star(results / f"network/{param}/inferred.star")["particles"]
        inf = inf.set_index("rlnImageName").loc[names]
        table = table.join(inf)
    lab = quality.labels_of(table, pixel_size, MODES)
    return hemnma.Start(lab["euler"], lab["shifts"], lab["amplitudes"])


def cpu_per_image(results: Path, pattern: str, stars: str) -> float:
    """CPU seconds per image of the workflow's jobs `benchmarks/<pattern>` (Snakemake's
    cpu_time, start-up included) over the particle rows of the STARs `<stars>` they ran on."""
    cpu = sum(
        pd.read_csv(f, sep="\t")["cpu_time"].sum() for f in results.glob(f"benchmarks/{pattern}")
    )
    n = sum(len(read_star(f)["particles"]) for f in results.glob(stars))
    return cpu / n if n else float("nan")  # nan: the run has no such jobs


def hybrid_figure(a: argparse.Namespace, settings: hemnma.AlignSettings) -> None:
    results = a.results.resolve()
    cwd = os.getcwd()
    os.chdir(results.parent)  # image names are relative to the workflow's directory
    try:
        ps = ParticleSet(results / "particles/particles.star")
        split = pd.read_csv(results / "network/split.csv")
        names = pd.Index(split.loc[split["set"] == "test", "rlnImageName"])
        rows = np.flatnonzero(ps.particles["rlnImageName"].isin(names).to_numpy())
        names = pd.Index(ps.particles["rlnImageName"].iloc[rows])
        truth = hemnma.Start(ps.euler(rows), ps.shifts_px(rows), ps.amplitudes(MODES, rows))
        hem = read_star(results / "hemnma/hemnma.star")["particles"].set_index("rlnImageName")
        hem_lab = quality.labels_of(hem.loc[names], ps.pixel_size, MODES)
        net = network_start(results, names, ps.pixel_size)
        start = hemnma.Start(*(np.zeros((len(ps), v.shape[1])) for v in vars(net).values()))
        for full, value in zip(vars(start).values(), vars(net).values(), strict=True):
            full[rows] = value  # align_rows takes starting values by particle row
        model = FlexibleModel.load(results / "model/model.npz", results / "model/modes.npz")
        new = lambda s: hemnma.Aligner(model, ps.box, ps.pixel_size, s, a.device)
        hem_res = {k: hem_lab[v] for k, v in LABELS.items()}
        lines = [
            row("network", errors(vars(net), truth), None),
            row("HEMNMA (the workflow's labels)", errors(hem_res, truth), None),
        ]
        for flip in (False, True):
            local = new(replace(settings, start="network", local_flip=flip))
            res, per = timed(ps, rows, local, start)
            lines.append(
                row(
                    f"hybrid (local from network{', + flip' if flip else ''})",
                    errors(res, truth),
                    per,
                )
            )
    finally:
        os.chdir(cwd)
    print(f"\n2. Hybrid on the {len(rows)} test images of {results}")
    print("\n".join(HEADER + lines))
    print("\nthe workflow's CPU seconds per image (Snakemake benchmarks, job start-up included):")
    print(
        f"network (3 inferences): {cpu_per_image(results, 'infer_*.tsv', 'particles/particles.star'):.3f}"
    )
    print(f"HEMNMA: {cpu_per_image(results, 'hemnma/*.tsv', 'hemnma/shards/*.star'):.3f}")
    print(f"hybrid: {cpu_per_image(results, 'hybrid/*.tsv', 'hybrid/shards/*.star'):.3f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--perturb-deg", type=float, default=5.0)
    p.add_argument("--perturb-px", type=float, default=2.0)
    p.add_argument("--basin", type=float, nargs="*", default=[15.0, 30.0])
    p.add_argument("--max-angle-deg", type=float, default=hemnma.AlignSettings.local_max_angle_deg)
    p.add_argument("--iterations", type=int, nargs=2, default=hemnma.AlignSettings.local_iterations)
    p.add_argument("--results", type=Path, default=None, help="a finished simulated run")
    p.add_argument("--skip-priors", action="store_true")
    a = p.parse_args()
    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = hemnma.AlignSettings(
        max_shift_px=6.0 * a.box / 128,
        local_max_angle_deg=a.max_angle_deg,
        local_iterations=tuple(a.iterations),
    )
    where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(
        f"local HEMNMA: iterations {settings.local_iterations}, bound "
        f"{settings.local_max_angle_deg:g}° / {settings.local_max_shift_px:g} px; {where}"
    )
    if not a.skip_priors:
        priors_figure(a, settings)
    if a.results is not None:
        hybrid_figure(a, settings)


if __name__ == "__main__":
    main()
