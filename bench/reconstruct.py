"""Reconstruction against cryoDRGN on the same particles, and reconstruction time.

Usage: python bench/reconstruct.py [--cases 250:none,2000:0.1] [--n-timing 10000] [--box 128]
                                  [--no-cryodrgn | --cryodrgn-venv DIR]

The particles come from an independent reference simulator written here (not deephemnma's
simulate): the exact continuous Fourier transform of the model's Gaussian atoms evaluated on each
image's DFT grid (a separable sum over atoms), times torch-ctf's CTF, plus white noise of one level
for all images (SNR = mean signal variance / noise variance). The true map is the same Fourier
transform on the 3D DFT grid, so the Fourier slice theorem holds exactly between particles and
truth. Both tools get the same STAR, stack and true poses;
cryoDRGN 4.3.1 (`backproject_voxel`) is installed into a temporary virtual environment (CPU torch
first) and skipped with a message when that fails; its maps are scored as they are and
multiplied by the same soft sphere as ours. The timing row uses N random images (the cost
does not depend on their content).
"""

import argparse
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch
from torch_ctf import calculate_ctf_2d

from deephemnma import geometry
from deephemnma.flexible import load_model
from deephemnma.fsc import fsc_curve, resolution
from deephemnma.io import ParticleSet, optics_table, write_star
from deephemnma.mrc import StackWriter
from deephemnma.reconstruct import reconstruct_halves, soft_sphere

REPO = Path(__file__).resolve().parents[1]
BOX, PX, SIGMA, KV, CS, AC = 128, 1.1, 1.0, 300.0, 2.7, 0.1
CRYODRGN = "cryodrgn==4.3.1"


def phase_axis(box: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequency in 1/Å, phase factor putting the origin at index box // 2) along one DFT axis,
    the Nyquist entry zeroed (it cannot be represented symmetrically)."""
    m = torch.fft.fftfreq(box, 1 / box) if full else torch.fft.rfftfreq(box, 1 / box)
    m = m.double()
    ph = torch.polar(torch.ones_like(m), -2 * math.pi * m * (box // 2) / box)
    ph[m.abs() == box // 2] = 0
    return m / (box * PX), ph


def atom_sum(pos: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """exp(-2πi k x) per atom and frequency: (..., N) positions (Å), k (K,) -> (..., N, K)."""
    return torch.polar(torch.ones((), dtype=pos.dtype), -2 * math.pi * pos[..., None] * k)


def true_map(coords: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """[z, y, x] map whose 3D DFT is the continuous FT of the Gaussian atoms (centre D // 2)."""
    kf, phf = phase_axis(BOX, True)
    kh, phh = phase_axis(BOX, False)
    ex = atom_sum(coords[:, 0], w, kh) * phh  # (N, X)
    ey = atom_sum(coords[:, 1], w, kf) * phf  # (N, Y)
    ez = atom_sum(coords[:, 2], w, kf) * phf  # (N, Z)
    g = lambda k: torch.exp(-2 * math.pi**2 * SIGMA**2 * k**2)
    f = torch.empty(BOX, BOX, len(kh), dtype=torch.complex128)
    for z in range(BOX):
        f[z] = (ey * (w * ez[:, z])[:, None]).T @ ex
    f *= g(kf)[:, None, None] * g(kf)[None, :, None] * g(kh)[None, None, :]
    return torch.fft.irfftn(f, s=(BOX, BOX, BOX)).float().numpy()


def particles(coords, w, rot, shift_a, defocus_um, snr, rng, batch=100):
    """Images (B, D, D): exact Fourier-space projections, CTF (torch-ctf), white noise at `snr`."""
    kf, phf = phase_axis(BOX, True)
    kh, phh = phase_axis(BOX, False)
    g = lambda k: torch.exp(-2 * math.pi**2 * SIGMA**2 * k**2)
    gauss = (g(kf)[:, None] * g(kh)[None, :] * phf[:, None] * phh[None, :]).to(torch.complex64)
    c32, w32 = coords.float(), w.float()
    out = np.empty((len(rot), BOX, BOX), dtype=np.float32)
    for s in range(0, len(rot), batch):
        r = rot[s : s + batch].float()
        xy = c32 @ r.transpose(-1, -2)[..., :2] + shift_a[s : s + batch, None, :].float()
        ex = atom_sum(xy[..., 0], w32, kh.float())  # (B, N, X)
        ey = atom_sum(xy[..., 1], w32, kf.float()) * w32[:, None]  # (B, N, Y)
        f = ey.transpose(-1, -2) @ ex * gauss
        ctf = calculate_ctf_2d(
            defocus=torch.tensor(defocus_um[s : s + batch], dtype=torch.float32),
            astigmatism=0.0,
            astigmatism_angle=0.0,
            voltage=KV,
            spherical_aberration=CS,
            amplitude_contrast=AC,
            phase_shift=0.0,
            pixel_size=PX,
            image_shape=(BOX, BOX),
            rfft=True,
            fftshift=False,
        )
        out[s : s + batch] = torch.fft.irfft2(f * ctf, s=(BOX, BOX)).numpy()
    # one noise level for all images (as in data): SNR = mean signal variance / noise variance
    sd = np.sqrt(out.var(axis=(1, 2)).mean() / (snr or 1.0))
    out /= sd
    if snr is not None:
        for s in range(0, len(out), batch):
            out[s : s + batch] += rng.standard_normal(out[s : s + batch].shape, dtype=np.float32)
    return out


def make_case(d: Path, coords, w, n: int, snr, seed: int) -> None:
    """p.star + stacks in `d`: n particles with uniform poses, ±2.5 px shifts, 1–2.5 µm defocus."""
    rng = np.random.default_rng(seed)
    eul = geometry.random_euler(n, rng)
    rot = geometry.euler_to_matrix(torch.tensor(eul, dtype=torch.float64))
    shift_a = rng.uniform(-2.5, 2.5, (n, 2)) * PX
    defocus = rng.uniform(1.0, 2.5, n)
    imgs = particles(coords, w, rot, torch.tensor(shift_a), defocus, snr, rng)
    os.chdir(d)  # image names relative to the STAR's folder
    writer = StackWriter("s", n, BOX, PX, n)
    writer.write(imgs)
    parts = pd.DataFrame(
        {
            "rlnImageName": writer.names,
            "rlnOpticsGroup": 1,
            "rlnAngleRot": eul[:, 0],
            "rlnAngleTilt": eul[:, 1],
            "rlnAnglePsi": eul[:, 2],
            "rlnOriginXAngst": -shift_a[:, 0],
            "rlnOriginYAngst": -shift_a[:, 1],
            "rlnDefocusU": defocus * 1e4,
            "rlnDefocusV": defocus * 1e4,
            "rlnDefocusAngle": 0.0,
            "rlnPhaseShift": 0.0,
        }
    )
    write_star(d / "p.star", optics_table(PX, BOX, KV, CS, AC), parts)


def scores(full, h1, h2, truth) -> dict:
    curve = fsc_curve(full, truth)
    row = {
        "FSC vs true map at 0.5": resolution(curve, BOX, PX, 0.5),
        "cc vs true map": float(np.corrcoef(full.ravel(), truth.ravel())[0, 1]),
        "half-maps at 0.143": None,
    }
    if h1 is not None:
        row["half-maps at 0.143"] = resolution(fsc_curve(h1, h2), BOX, PX, 0.143)
    return row


def ours(d: Path, truth: np.ndarray) -> dict:
    ps = ParticleSet(d / "p.star")
    half = np.random.default_rng(0).permutation(len(ps)) % 2
    t = time.perf_counter()
    h1, h2, full = reconstruct_halves(ps, np.arange(len(ps)), half)
    return {"wall time": time.perf_counter() - t, **scores(full, h1, h2, truth)}


def cryodrgn_env(venv: Path) -> Path | None:
    """A venv with cryoDRGN (CPU torch first); None with a message when it cannot be installed."""
    if (venv / "bin/cryodrgn").exists():
        return venv / "bin/cryodrgn"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin/pip"), "install", "-q", "torch==2.13.0"],
        [str(venv / "bin/pip"), "install", "-q", CRYODRGN],
    ]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"cryoDRGN skipped: `{' '.join(cmd[-3:])}` failed: {r.stderr.strip()[-300:]}")
            return None
    return venv / "bin/cryodrgn"


def cryodrgn(exe: Path, d: Path, truth: np.ndarray) -> dict:
    def run(*args):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=d)
        if r.returncode:
            raise RuntimeError(f"cryodrgn {args[0]} failed: {r.stderr.strip()[-600:]}")

    run("parse_pose_star", "p.star", "-o", "pose.pkl", "-D", str(BOX), "--Apix", str(PX))
    run("parse_ctf_star", "p.star", "-o", "ctf.pkl", "-D", str(BOX), "--Apix", str(PX))
    t = time.perf_counter()
    run("backproject_voxel", "p.star", "--poses", "pose.pkl",
        "--ctf", "ctf.pkl", "-o", "cdrgn")  # fmt: skip
    dt = time.perf_counter() - t
    read = lambda name: mrcfile.read(d / "cdrgn" / name).astype(np.float32)
    halves = [d / "cdrgn" / n for n in ("half_map_a.mrc", "half_map_b.mrc")]
    h1, h2 = (read(h.name) for h in halves) if all(h.exists() for h in halves) else (None, None)
    full = read("backproject.mrc")
    # the same soft sphere as ours, so that the comparison is of the maps, not of the mask
    m = soft_sphere(BOX).numpy()
    masked = [None if v is None else v * m for v in (full, h1, h2)]
    return [
        {"tool": "cryoDRGN backproject_voxel", "wall time": dt, **scores(full, h1, h2, truth)},
        {"tool": "cryoDRGN, our soft sphere", "wall time": dt, **scores(*masked, truth)},
    ]


def timing(n: int, box: int) -> float:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        w = StackWriter(Path(d) / "s", n, box, PX, 10000)
        for s in range(0, n, 500):
            w.write(rng.standard_normal((min(500, n - s), box, box), dtype=np.float32))
        eul = geometry.random_euler(n, rng)
        parts = pd.DataFrame(
            {
                "rlnImageName": w.names,
                "rlnOpticsGroup": 1,
                "rlnAngleRot": eul[:, 0],
                "rlnAngleTilt": eul[:, 1],
                "rlnAnglePsi": eul[:, 2],
                "rlnOriginXAngst": 0.0,
                "rlnOriginYAngst": 0.0,
                "rlnDefocusU": 15000.0,
                "rlnDefocusV": 15000.0,
                "rlnDefocusAngle": 0.0,
                "rlnPhaseShift": 0.0,
            }
        )
        write_star(Path(d) / "p.star", optics_table(PX, box, KV, CS, AC), parts)
        ps = ParticleSet(Path(d) / "p.star")
        t = time.perf_counter()
        reconstruct_halves(ps, np.arange(n), rng.permutation(n) % 2)
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--cases", default="250:none,2000:0.1", help="n:snr pairs ('none': no noise; '' none)"
    )
    p.add_argument("--box", type=int, default=128, help="pixel size 1.1 × 128 / box Å")
    p.add_argument("--n-timing", type=int, default=10000, help="0 skips the timing row")
    p.add_argument("--no-cryodrgn", action="store_true")
    p.add_argument("--cryodrgn-venv", type=Path, help="reuse this venv instead of a fresh one")
    a = p.parse_args()
    global BOX, PX
    BOX, PX = a.box, 1.1 * 128 / a.box
    print(f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "deephemnma", "prepare-model", "--structure",
             str(REPO / "resources/adk_open.pdb"), "--out-npz", str(root / "model.npz"),
             "--out-pdb", str(root / "model.pdb")],
            check=True, capture_output=True,
        )  # fmt: skip
        m = load_model(root / "model.npz")
        coords, w = torch.tensor(m["coords"]).double(), torch.tensor(m["weights"]).double()
        t = time.perf_counter()
        truth = true_map(coords, w)
        print(f"true map: {time.perf_counter() - t:.1f} s")
        exe = None if a.no_cryodrgn else cryodrgn_env(a.cryodrgn_venv or root / "venv")
        rows = []
        for case in filter(None, a.cases.split(",")):
            n, snr = case.split(":")
            snr = None if snr == "none" else float(snr)
            d = root / case.replace(":", "_")
            d.mkdir()
            t = time.perf_counter()
            make_case(d, coords, w, int(n), snr, seed=len(rows))
            label = f"{int(n):,}, " + ("noise-free" if snr is None else f"SNR {snr:g}")
            print(f"{label}: simulated in {time.perf_counter() - t:.1f} s")
            rows.append({"particles": label, "tool": "deephemnma reconstruct",
                         **ours(d, truth)})  # fmt: skip
            if exe is not None:
                rows += [{"particles": label, **r} for r in cryodrgn(exe, d, truth)]
            print(pd.DataFrame(rows[-3:]).to_string(index=False), flush=True)
        os.chdir(cwd)
    if rows:
        table = pd.DataFrame(rows)
        print(f"\nbox {BOX}, {PX} Å/px (Nyquist {2 * PX:.2f} Å); resolutions in Å, times in s")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if a.n_timing:
        dt = timing(a.n_timing, BOX)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"\nreconstruct {a.n_timing} random images at {BOX}² (CTF, 2 half-maps + map): "
            f"{dt:.1f} s ({a.n_timing / dt:.0f} images/s), peak RSS {peak:.0f} MB"
        )


if __name__ == "__main__":
    main()
