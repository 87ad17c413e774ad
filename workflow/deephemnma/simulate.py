"""simulate: particle images of a flexible atomic model with ground truth (the paper's protocol).

Per image: amplitudes (uniform ±A, normal, clusters or a line), an orientation uniform on SO(3),
a shift, a defocus; the model is deformed along its normal modes, projected at `oversample` × the
box, Fourier-cropped, multiplied by the CTF, and white noise is added at the requested SNR. Images
are scaled so that the noise has unit standard deviation (as RELION normalises particles).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import geometry, imaging
from .figures import pyplot, save_figure
from .flexible import FlexibleModel
from .io import (
    amplitude_column,
    optics_table,
    pose_columns,
    table_euler,
    table_shifts_px,
    write_star,
)
from .mrc import StackWriter

log = logging.getLogger(__name__)


@dataclass
class SimulationSettings:
    """Sampling and imaging of simulated particles; the CLI's defaults are these."""

    box: int = 64
    pixel_size: float = 2.2  # Å
    oversample: int = 2  # projected at oversample × box, then Fourier-cropped
    sigma_angstrom: float = 1.0  # Gaussian atom width
    snr: float | None = None  # None: noise-free
    ctf: bool = True
    max_shift_px: float = 2.5
    amplitude_distribution: str = "uniform"  # uniform | normal | clusters | line
    amplitude_scale: float = 150.0
    n_clusters: int = 3
    defocus: tuple[float, float] = (5000.0, 5000.0)  # Å, uniform in [min, max]
    voltage_kv: float = 200.0
    cs_mm: float = 2.0
    amplitude_contrast: float = 0.1
    bfactor: float = 0.0
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulationSettings:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


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


def draw_parameters(n: int, mode_numbers: np.ndarray, cfg: SimulationSettings) -> pd.DataFrame:
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
            **pose_columns(euler, shifts, cfg.pixel_size),
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
    model: FlexibleModel,
    params: pd.DataFrame,
    cfg: SimulationSettings,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Images of `model` (torch arrays) for one batch of parameter rows (amplitude columns of its
    mode numbers): 'clean', 'ctf' and 'final' (noisy, normalised)."""
    dt, dev = model.coords.dtype, model.coords.device
    col = lambda names: torch.tensor(params[names].to_numpy(), dtype=dt, device=dev)
    amps = col([amplitude_column(int(k)) for k in model.mode_numbers])
    deformed = model.deform(amps)
    rot = geometry.euler_to_matrix(torch.tensor(table_euler(params), dtype=dt, device=dev))
    shift = torch.tensor(table_shifts_px(params, cfg.pixel_size), dtype=dt, device=dev)
    big, px_big = cfg.box * cfg.oversample, cfg.pixel_size / cfg.oversample
    shift = shift * cfg.oversample  # in pixels of the oversampled box
    # atoms are splatted no wider than one oversampled pixel (small footprints), then widened
    # to their width in Fourier space; what aliases back into the kept band is below 1e-4. The
    # widening is a circular convolution: with an atom within reach of the edges, full width
    pos = imaging.projected_positions(deformed, rot, shift, big, px_big)
    reach = imaging.FOOTPRINT_SIGMAS * cfg.sigma_angstrom / px_big + 1
    inside = bool((pos >= reach).all() and (pos <= big - 1 - reach).all())
    narrow = min(cfg.sigma_angstrom, px_big) if inside else cfg.sigma_angstrom
    proj = imaging.project(deformed, rot, shift, model.weights, big, px_big, narrow)
    widen = imaging.widen_gaussians(cfg.box, cfg.pixel_size, narrow, cfg.sigma_angstrom, dev)
    spectrum = torch.fft.rfft2(imaging.fourier_crop(proj, cfg.box)) * widen
    clean = torch.fft.irfft2(spectrum, s=(cfg.box, cfg.box))
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
        out["ctf"] = torch.fft.irfft2(spectrum * c, s=(cfg.box, cfg.box))
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
    d, s = " (default: %(default)s)", SimulationSettings()
    p.add_argument("--model", required=True, help="model.npz (weights)")
    p.add_argument("--modes", required=True, help="modes.npz")
    p.add_argument("--n-images", type=int, required=True, help="number of particles")
    p.add_argument("--box", type=int, default=s.box, help="image size in pixels" + d)
    p.add_argument("--pixel-size", type=float, default=s.pixel_size, help="Å per pixel" + d)
    p.add_argument(
        "--oversample", type=int, default=s.oversample, help="projection oversampling" + d
    )
    p.add_argument(
        "--sigma-angstrom", type=float, default=s.sigma_angstrom, help="Gaussian atom width" + d
    )
    p.add_argument("--snr", type=float, default=s.snr, help="omit for noise-free images")
    p.add_argument(
        "--ctf", action=argparse.BooleanOptionalAction, default=s.ctf, help="apply the CTF"
    )
    p.add_argument(
        "--max-shift-px", type=float, default=s.max_shift_px, help="shifts uniform in ±this" + d
    )
    p.add_argument(
        "--amplitude-distribution",
        default=s.amplitude_distribution,
        choices=["uniform", "normal", "clusters", "line"],
        help="distribution of the mode amplitudes" + d,
    )
    p.add_argument(
        "--amplitude-scale", type=float, default=s.amplitude_scale, help="amplitude range" + d
    )
    p.add_argument(
        "--n-clusters", type=int, default=s.n_clusters, help="clusters (distribution clusters)" + d
    )
    p.add_argument(
        "--defocus",
        type=float,
        nargs=2,
        default=list(s.defocus),
        metavar=("MIN", "MAX"),
        help="defocus range in Å" + d,
    )
    p.add_argument("--voltage-kv", type=float, default=s.voltage_kv, help=d.strip())
    p.add_argument("--cs-mm", type=float, default=s.cs_mm, help="spherical aberration" + d)
    p.add_argument("--amplitude-contrast", type=float, default=s.amplitude_contrast, help=d.strip())
    p.add_argument("--bfactor", type=float, default=s.bfactor, help="CTF B-factor (Å²)" + d)
    p.add_argument("--images-per-stack", type=int, default=10000, help="MRCS stack size" + d)
    p.add_argument("--batch", type=int, default=16, help="images rendered at once" + d)
    p.add_argument("--seed", type=int, default=s.seed, help="random seed" + d)
    p.add_argument("--out-star", required=True, help="particle STAR with the ground truth")
    p.add_argument("--out-stacks", required=True, help="folder for the MRCS stacks")
    p.add_argument("--out-montage", default=None, help="figure of example particles")


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FlexibleModel.load(args.model, args.modes).to(device)
    numbers = model.mode_numbers
    cfg = SimulationSettings.from_args(args)
    params = draw_parameters(args.n_images, numbers, cfg)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    writer = StackWriter(
        args.out_stacks, args.n_images, args.box, args.pixel_size, args.images_per_stack
    )
    try:
        for start in tqdm(
            range(0, args.n_images, args.batch), desc="simulate", unit="batch", mininterval=5
        ):
            rows = params.iloc[start : start + args.batch]
            out = render(model, rows, cfg, gen)
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
