"""HEMNMA accuracy and speed on the reference protocol (docs/protocol.md), reduced in size.

Simulates open-AK particles (modes 7-9, uniform ±150, uniform SO(3), shifts ±5 px at 128 px,
200 kV, Cs 2 mm, 5,000 Å defocus, SNR 0.1), aligns them and prints the paper's table: angular
distance to ground truth (mean/std, degrees), |amplitude error| per mode, shift error, and the
seconds per image per CPU core (wall × threads / images).

Usage: python bench/hemnma.py [--n-images 200] [--box 128] [--no-noise] [--amplitude-prior 0]
       [--retry 0.05] [--retry-candidates 16] [--threads 1]
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deephemnma import geometry, hemnma
from deephemnma.flexible import FlexibleModel
from deephemnma.io import ParticleSet

REPO = Path(__file__).resolve().parents[1]


def run(cmd, cwd):
    subprocess.run(
        [sys.executable, "-m", "deephemnma", *cmd], cwd=cwd, check=True, capture_output=True
    )


def reference_set(d: str, n_images: int, box: int, noise: bool, seed: int = 7) -> None:
    """Write model.npz, modes.npz and p.star (+ stacks) of the reference protocol into `d`:
    open AK, modes 7-9 uniform ±150, shifts ±5 px at 128 px, 1.1 Å/px at 128 px; with `noise`,
    CTF (200 kV, 5,000 Å) and SNR 0.1, else neither."""
    pdb = str(REPO / "resources/adk_open.pdb")
    run(
        ["prepare-model", "--structure", pdb, "--out-npz", "model.npz", "--out-pdb", "model.pdb"], d
    )
    nma = ["nma", "--model", "model.npz", "--pdb", "model.pdb", "--out-npz", "modes.npz"]
    run([*nma, "--out-nmd", "m.nmd", "--out-table", "m.csv", "--out-anim-dir", "anim"], d)
    sim = ["simulate", "--model", "model.npz", "--modes", "modes.npz", "--n-images", str(n_images)]
    sim += ["--box", str(box), "--pixel-size", str(1.1 * 128 / box)]
    sim += ["--max-shift-px", str(5 * box / 128), "--seed", str(seed)]
    sim += ["--out-star", "p.star", "--out-stacks", "s"]
    run(sim + (["--snr", "0.1"] if noise else ["--no-ctf"]), d)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--no-noise", action="store_true", help="no noise and no CTF")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--candidates", type=int, default=hemnma.AlignSettings.candidates)
    p.add_argument("--retry", type=float, default=hemnma.AlignSettings.retry)
    p.add_argument("--retry-candidates", type=int, default=hemnma.AlignSettings.retry_candidates)
    p.add_argument("--n-directions", type=int, default=hemnma.AlignSettings.n_directions)
    p.add_argument("--amplitude-prior", type=float, default=hemnma.AlignSettings.amplitude_prior)
    p.add_argument(
        "--coarse-cell",
        type=float,
        default=hemnma.AlignSettings.coarse_cell,
        help="coarse refinement on pseudo-atoms per cube of this edge (coarse px); 0: atoms",
    )
    p.add_argument(
        "--full-cell",
        type=float,
        default=hemnma.AlignSettings.full_cell,
        help="full-box refinement on pseudo-atoms per cube of this edge (full-box px); 0: atoms",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: as one MPI rank per core runs)"
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as d:
        reference_set(d, a.n_images, a.box, not a.no_noise)
        cwd = os.getcwd()
        os.chdir(d)
        ps = ParticleSet("p.star")
        model = FlexibleModel.load("model.npz", "modes.npz")
        settings = hemnma.AlignSettings(
            batch=a.batch,
            max_shift_px=6.0 * a.box / 128,
            candidates=a.candidates,
            retry=a.retry,
            retry_candidates=a.retry_candidates,
            n_directions=a.n_directions,
            amplitude_prior=a.amplitude_prior,
            coarse_cell=a.coarse_cell,
            full_cell=a.full_cell,
        )
        t0 = time.perf_counter()
        al = hemnma.Aligner(
            model,
            ps.box,
            ps.pixel_size,
            settings,
            device,
        )
        t1 = time.perf_counter()
        res = hemnma.align_rows(ps, np.arange(len(ps)), al)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        ang = geometry.euler_distance_deg(res["euler"], ps.euler())
        amp = np.abs(res["amplitudes"] - ps.amplitudes([7, 8, 9]))
        sh = np.linalg.norm(res["shifts_px"] - ps.shifts_px(), axis=1)
        os.chdir(cwd)
    threads = torch.get_num_threads()
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else (f"{platform.machine()} CPU, {threads} threads")
    )
    cond = "no noise, no CTF" if a.no_noise else "CTF + SNR 0.1"
    cond += f", amplitude prior {a.amplitude_prior:g}" if a.amplitude_prior else ""
    cond += (
        f", coarse cell {a.coarse_cell:g} px" if a.coarse_cell else ", coarse stage on the atoms"
    )
    cond += f", full-box cell {a.full_cell:g} px" if a.full_cell else ", full box on the atoms"
    cond += f"; {a.retry:.0%} searched again with {a.retry_candidates} candidates"
    print(f"HEMNMA on {a.n_images} images, {a.box} px, {cond}; {where}")
    print(
        f"  angular distance to truth: mean {ang.mean():.2f} deg, std {ang.std():.2f} deg, "
        f"median {np.median(ang):.2f}, >10 deg: {(ang > 10).mean():.1%}"
    )
    for j, k in enumerate((7, 8, 9)):
        print(
            f"  mode {k}: |amplitude error| mean {amp[:, j].mean():.1f}, std {amp[:, j].std():.1f}"
        )
    print(f"  mean over modes: {amp.mean():.1f}; shift error mean {sh.mean():.2f} px")
    per = (t2 - t1) / a.n_images
    if device.type == "cuda":
        print(f"  {1 / per:.1f} images/s on the GPU (gallery {t1 - t0:.1f} s once)")
    else:
        print(
            f"  {per * threads:.2f} s per image per core ({per:.2f} s wall on {threads} threads;"
            f" gallery {t1 - t0:.1f} s once)"
        )


if __name__ == "__main__":
    main()
