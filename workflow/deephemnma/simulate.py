"""simulate: particle images of a flexible atomic model with ground truth (the paper's protocol).

Per image: amplitudes (uniform ±A, normal, clusters or a line), an orientation uniform on SO(3),
a shift, a defocus; the model is deformed along its normal modes, projected at `oversample` × the
box, Fourier-cropped, multiplied by the CTF, and white noise is added at the requested SNR. Images
are scaled so that the noise has unit standard deviation (as RELION normalises particles).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import geometry, imaging
from .io import (
    StackWriter,
    amplitude_column,
    load_model,
    load_modes,
    optics_table,
    pyplot,
    save_figure,
    write_star,
)

log = logging.getLogger(__name__)


def draw_amplitudes(
    n: int, k: int, distribution: str, scale: float, n_clusters: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, k) amplitudes: uniform in [-scale, scale], normal (std scale/2), clusters, or a line."""
    if distribution == "uniform":
        return rng.uniform(-scale, scale, size=(n, k))
    if distribution == "normal":
        return rng.normal(0.0, scale / 2, size=(n, k))
    if distribution == "clusters":
        centres = rng.uniform(-scale, scale, size=(n_clusters, k))
        return centres[rng.integers(n_clusters, size=n)] + rng.normal(0, scale / 10, size=(n, k))
    if distribution == "line":
        direction = rng.normal(size=k)
        direction /= np.linalg.norm(direction)
        t = rng.uniform(-1, 1, size=(n, 1))
        return t * scale * direction + rng.normal(0, scale / 20, size=(n, k))
    raise ValueError(f"unknown amplitude distribution '{distribution}'")


def draw_parameters(n: int, mode_numbers: np.ndarray, cfg: argparse.Namespace) -> pd.DataFrame:
    """Ground-truth table (RELION columns + dhAmplitudeMode<k>) for n images, seeded."""
    rng = np.random.default_rng(cfg.seed)
    amps = draw_amplitudes(
        n, len(mode_numbers), cfg.amplitude_distribution, cfg.amplitude_scale, cfg.n_clusters, rng
    )
    euler = geometry.random_euler(n, rng)
    shifts = rng.uniform(-cfg.max_shift_px, cfg.max_shift_px, size=(n, 2))
    defocus = rng.uniform(cfg.defocus[0], cfg.defocus[1], size=n)
    table = pd.DataFrame(
        {
            "rlnAngleRot": euler[:, 0],
            "rlnAngleTilt": euler[:, 1],
            "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": -shifts[:, 0] * cfg.pixel_size,
            "rlnOriginYAngst": -shifts[:, 1] * cfg.pixel_size,
            "rlnDefocusU": defocus,
            "rlnDefocusV": defocus,
            "rlnDefocusAngle": np.zeros(n),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.full(n, cfg.bfactor),
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    for j, k in enumerate(mode_numbers):
        table[amplitude_column(int(k))] = amps[:, j]
    return table


def render(
    coords: torch.Tensor,
    modes: torch.Tensor,
    weights: torch.Tensor,
    params: pd.DataFrame,
    mode_numbers: np.ndarray,
    cfg: argparse.Namespace,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Images of one batch of parameter rows: 'clean', 'ctf' and 'final' (noisy, normalised)."""
    dt, dev = coords.dtype, coords.device
    col = lambda names: torch.tensor(params[names].to_numpy(), dtype=dt, device=dev)
    amps = col([amplitude_column(int(k)) for k in mode_numbers])
    deformed = coords + torch.einsum("bk,knc->bnc", amps, modes)
    rot = geometry.euler_to_matrix(col(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]))
    shift = -col(["rlnOriginXAngst", "rlnOriginYAngst"])
    big, px_big = cfg.box * cfg.oversample, cfg.pixel_size / cfg.oversample
    proj = imaging.project(deformed, rot, shift / px_big, weights, big, px_big, cfg.sigma_angstrom)
    clean = imaging.fourier_crop(proj, cfg.box)
    out = {"clean": clean}
    if cfg.ctf:
        c = imaging.ctf(
            col("rlnDefocusU"),
            col("rlnDefocusV"),
            col("rlnDefocusAngle"),
            cfg.voltage_kv,
            cfg.cs_mm,
            cfg.amplitude_contrast,
            cfg.pixel_size,
            cfg.box,
            bfactor=cfg.bfactor,
        )
        out["ctf"] = imaging.apply_ctf(clean, c)
    else:
        out["ctf"] = clean
    if cfg.snr is not None:
        noisy = imaging.add_noise(out["ctf"], cfg.snr, generator)
        scale = torch.sqrt(out["ctf"].var(dim=(-2, -1), keepdim=True) / cfg.snr)
        out["final"] = noisy / scale
    else:
        out["final"] = out["ctf"] / out["ctf"].std(dim=(-2, -1), keepdim=True)
    return out


def montage(images: dict[str, np.ndarray], path: str | Path) -> None:
    """Figure: a few views clean, with CTF, and with CTF + noise (paper Figure S1)."""
    plt = pyplot()

    rows = [("clean", "projection"), ("ctf", "with CTF"), ("final", "with CTF and noise")]
    n = images["clean"].shape[0]
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6.3), squeeze=False)
    for r, (key, label) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[key][c], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model.npz (weights)")
    p.add_argument("--modes", required=True, help="modes.npz")
    p.add_argument("--n-images", type=int, required=True)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.2)
    p.add_argument("--oversample", type=int, default=2)
    p.add_argument("--sigma-angstrom", type=float, default=1.0)
    p.add_argument("--snr", type=float, default=None, help="omit for noise-free images")
    p.add_argument("--no-ctf", dest="ctf", action="store_false")
    p.add_argument("--max-shift-px", type=float, default=2.5)
    p.add_argument(
        "--amplitude-distribution",
        default="uniform",
        choices=["uniform", "normal", "clusters", "line"],
    )
    p.add_argument("--amplitude-scale", type=float, default=150.0)
    p.add_argument("--n-clusters", type=int, default=3)
    p.add_argument(
        "--defocus", type=float, nargs=2, default=[5000.0, 5000.0], metavar=("MIN", "MAX")
    )
    p.add_argument("--voltage-kv", type=float, default=200.0)
    p.add_argument("--cs-mm", type=float, default=2.0)
    p.add_argument("--amplitude-contrast", type=float, default=0.1)
    p.add_argument("--bfactor", type=float, default=0.0)
    p.add_argument("--images-per-stack", type=int, default=10000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-star", required=True)
    p.add_argument("--out-stacks", required=True, help="folder for the MRCS stacks")
    p.add_argument("--out-montage", default=None)


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, modes_npz = load_model(args.model), load_modes(args.modes)
    numbers = modes_npz["mode_numbers"]
    t = lambda a: torch.tensor(a, dtype=torch.float32, device=device)
    coords, modes, weights = t(model["coords"]), t(modes_npz["modes"]), t(model["weights"])
    params = draw_parameters(args.n_images, numbers, args)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    writer = StackWriter(
        args.out_stacks, args.n_images, args.box, args.pixel_size, args.images_per_stack
    )
    try:
        for start in tqdm(
            range(0, args.n_images, args.batch), desc="simulate", unit="batch", mininterval=5
        ):
            rows = params.iloc[start : start + args.batch]
            out = render(coords, modes, weights, rows, numbers, args, gen)
            writer.write(out["final"].cpu().numpy())
            if start == 0 and args.out_montage:
                montage({k: v[:6].cpu().numpy() for k, v in out.items()}, args.out_montage)
    except BaseException:
        writer.abort()
        raise
    params.insert(0, "rlnImageName", writer.names)
    optics = optics_table(
        args.pixel_size,
        args.box,
        args.voltage_kv,
        args.cs_mm,
        args.amplitude_contrast,
        has_ctf=args.ctf,
    )
    write_star(args.out_star, optics, params)
    log.info(
        "simulated %d images (%d px, %.3f Å/px) -> %s",
        args.n_images,
        args.box,
        args.pixel_size,
        args.out_star,
    )
