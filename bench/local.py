"""Local HEMNMA refinement from a given pose against full HEMNMA (reference protocol, reduced).

1. Consensus priors: reference-protocol particles (open AK, modes 7-9 uniform ±150, 1.1 Å/px at
   128 px, CTF, SNR 0.1) aligned by full HEMNMA (global search + refinement) and by local
   refinement from the true pose perturbed by `--perturb-deg` (random axis) and `--perturb-px`
   (random direction), amplitudes starting at zero as from a rigid consensus refinement; then
   from larger perturbations (`--basin`, the basin of convergence). Errors against the truth and
   seconds per image per core (wall × threads / images).
2. Hybrid (with `--results`, a finished simulated workflow run with `hybrid.enabled`): on the first
   `--n-images` images its hybrid refined, the errors against the truth of its networks
   (network/deephemnma.star), of its hybrid (network/hybrid.star) and of full HEMNMA run here on
   the same images; seconds per image per core.

    flock /tmp/heavy.lock python bench/local.py [--n-images 256] [--box 64] [--seed 7]
        [--results results] [--skip-priors]
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
        reference_set(d, a.n_images, a.box, noise=True, seed=a.seed)
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
            lines, first = [], None
            for deg, px in [(a.perturb_deg, a.perturb_px)] + [(b, a.perturb_px) for b in a.basin]:
                start = perturbed(truth, deg, px, rng)
                res, per = timed(ps, rows, local, start)
                start_err = errors(vars(start), truth)
                lines.append(row(f"start: truth + {deg:g}° / {px:g} px", start_err, None))
                lines.append(row(f"local from it ({deg:g}° / {px:g} px)", errors(res, truth), per))
                first = per if first is None else first
            t_full = (t_full + timed(ps, rows, new(settings))[1]) / 2  # the machine's speed drifts
            lines.insert(
                0, row("full HEMNMA (global search + refinement)", errors(full, truth), t_full)
            )
        finally:
            os.chdir(cwd)
    print(f"\n1. Local refinement from priors: {a.n_images} images, {a.box} px, CTF + SNR 0.1")
    print("\n".join(HEADER + lines))
    print(
        f"(full HEMNMA's seconds: the mean of a run before and after the local ones; local from "
        f"{a.perturb_deg:g}° / {a.perturb_px:g} px: {first / t_full:.3f} × its time per image)"
    )


def table_start(table: pd.DataFrame, pixel_size: float) -> hemnma.Start:
    """Poses, shifts and amplitudes of a STAR's particle table, as a Start."""
    lab = quality.labels_of(table, pixel_size, MODES)
    return hemnma.Start(lab["euler"], lab["shifts"], lab["amplitudes"])


def seconds_per_image(results: Path, pattern: str, stars: str, threads: int) -> float:
    """Seconds per image per core of the workflow's jobs `benchmarks/<pattern>` (Snakemake's wall
    time × the jobs' `threads`, start-up included) over the particle rows of the STARs `<stars>`
    they ran on."""
    wall = sum(pd.read_csv(f, sep="\t")["s"].sum() for f in results.glob(f"benchmarks/{pattern}"))
    n = sum(len(read_star(f)["particles"]) for f in results.glob(stars))
    return wall * threads / n if n else float("nan")  # nan: the run has no such jobs


def hybrid_figure(a: argparse.Namespace) -> None:
    """The workflow's networks and hybrid against full HEMNMA run here, on the same images: the
    first `--n-images` of those the hybrid refined (network/hybrid.star, `_dhSourceAngles`
    hybrid)."""
    results = a.results.resolve()
    cwd = os.getcwd()
    os.chdir(a.workdir or results.parent)  # image names are relative to the workflow's directory
    try:
        ps = ParticleSet(results / "particles/particles.star")
        hyb = read_star(results / "network/hybrid.star")["particles"]
        names = pd.Index(hyb.loc[hyb["dhSourceAngles"] == "hybrid", "rlnImageName"][: a.n_images])
        rows = np.flatnonzero(ps.particles["rlnImageName"].isin(names).to_numpy())
        names = pd.Index(ps.particles["rlnImageName"].iloc[rows])
        truth = hemnma.Start(ps.euler(rows), ps.shifts_px(rows), ps.amplitudes(MODES, rows))
        merged = read_star(results / "network/deephemnma.star")["particles"]
        net = table_start(merged.set_index("rlnImageName").loc[names], ps.pixel_size)
        hybrid = table_start(hyb.set_index("rlnImageName").loc[names], ps.pixel_size)
        model = FlexibleModel.load(results / "model/model.npz", results / "model/modes.npz")
        search = hemnma.AlignSettings(coarse_cell=a.coarse_cell, full_cell=a.full_cell)
        full, per = timed(ps, rows, hemnma.Aligner(model, ps.box, ps.pixel_size, search, a.device))
    finally:
        os.chdir(cwd)
    ranks = a.ranks  # threads of a shard job (hemnma.ranks)
    t = lambda pattern, stars, n: seconds_per_image(results, pattern, stars, n)
    lines = [
        row("networks", errors(vars(net), truth), t("infer_*.tsv", "particles/particles.star", 2)),
        row("hybrid (the workflow's)", errors(vars(hybrid), truth), t("hybrid/*.tsv", "hybrid/shards/*.star", ranks)),
        row("HEMNMA (global search, run here)", errors(full, truth), per),
    ]  # fmt: skip
    print(f"\n2. Hybrid: {len(rows)} of the images {results} refined by the hybrid")
    print("\n".join(HEADER + lines))
    print(
        "(seconds per image per core: the workflow's jobs from their Snakemake benchmarks, wall × "
        "threads, start-up included; HEMNMA's in-process. The workflow's own HEMNMA jobs: "
        f"{t('hemnma/*.tsv', 'hemnma/shards/*.star', ranks):.3f})"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    d = hemnma.AlignSettings()
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--seed", type=int, default=7, help="the simulated particles' seed")
    p.add_argument("--perturb-deg", type=float, default=5.0)
    p.add_argument("--perturb-px", type=float, default=2.0)
    p.add_argument("--basin", type=float, nargs="*", default=[15.0, 30.0])
    p.add_argument("--max-angle-deg", type=float, default=d.local_max_angle_deg)
    p.add_argument("--iterations", type=int, nargs=2, default=d.local_iterations)
    p.add_argument("--starts", type=int, default=d.local_starts, help="amplitude starts")
    p.add_argument("--prune-after", type=int, default=d.local_prune_after)
    p.add_argument(
        "--local-retry", type=float, default=d.local_retry, help="share refined unpruned"
    )
    p.add_argument(
        "--coarse-cell",
        type=float,
        default=d.coarse_cell,
        help="coarse refinement on pseudo-atoms per cube of this edge (coarse px); 0: atoms",
    )
    p.add_argument(
        "--full-cell",
        type=float,
        default=d.full_cell,
        help="full-box refinement on pseudo-atoms per cube of this edge (full-box px); 0: atoms",
    )
    p.add_argument(
        "--local-coarse-cell",
        type=float,
        default=d.local_coarse_cell,
        help="local refinement's coarse stage on pseudo-atoms per cube of this edge (coarse px)",
    )
    p.add_argument("--results", type=Path, default=None, help="a finished simulated run")
    p.add_argument("--skip-priors", action="store_true")
    p.add_argument("--ranks", type=int, default=1, help="the run's hemnma.ranks")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the run was made (default: above --results)",
    )
    a = p.parse_args()
    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = hemnma.AlignSettings(
        max_shift_px=6.0 * a.box / 128,
        local_max_angle_deg=a.max_angle_deg,
        local_iterations=tuple(a.iterations),
        local_starts=a.starts,
        local_prune_after=a.prune_after,
        local_retry=a.local_retry,
        coarse_cell=a.coarse_cell,
        full_cell=a.full_cell,
        local_coarse_cell=a.local_coarse_cell,
    )
    where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(
        f"local HEMNMA: iterations {settings.local_iterations}, bound "
        f"{settings.local_max_angle_deg:g}° / {settings.local_max_shift_px:g} px, "
        f"{settings.local_starts} amplitude starts pruned after {settings.local_prune_after}, "
        f"local retry {settings.local_retry:g}, search retry {settings.retry:g}, coarse cell "
        f"{settings.coarse_cell:g} px (local {settings.local_coarse_cell:g}), full-box cell "
        f"{settings.full_cell:g} px; {where}"
    )
    if not a.skip_priors:
        priors_figure(a, settings)
    if a.results is not None:
        hybrid_figure(a)


if __name__ == "__main__":
    main()
