"""synthesize: pretraining images rendered from the flexible model with the data's own statistics.

Networks trained on a few hundred HEMNMA-labelled images at SNR 0.1 learn nothing; images rendered
from the model itself have exact labels and can be made in any number. Each synthetic image draws
amplitudes uniformly within the range of the labelled amplitudes (per mode), an orientation uniform
on SO(3), a shift uniform within the labelled shift range (per axis) and the CTF of a particle of
the data set chosen at random; the model is deformed, projected at the networks' working box and
multiplied by that CTF (its parameters are stored with the labels). Images are stored
noise-free; training adds fresh white noise every epoch.

Noise estimator (at the working box, after the same Fourier crop as the networks' input): the mean
radial power spectrum of the real images, P(k), is fitted by least squares as a·S(k) + b over the
shells 1 .. box/2 - 1, with S(k) the mean radial power spectrum of noise-free synthetic images
drawn with the same prior and the CTFs of the same particles. `b` is the white-noise power:
σ² = b / box² per pixel. Clean images are stored × √a, so clean + σ·N(0, 1) has the data's signal
and noise power at every frequency the fit explains. The spectra are plotted for the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import geometry, imaging, simulate
from .figures import pyplot, save_figure
from .files import InputError, atomic_path, require_file
from .flexible import FlexibleModel
from .io import ParticleSet, amplitude_column, amplitude_modes, pose_columns, unflagged
from .quality import labels_of

log = logging.getLogger(__name__)


@dataclass
class Prior:
    """What synthetic images are drawn from (shifts in pixels of the data's box)."""

    mode_numbers: list[int]
    amplitude_low: list[float]
    amplitude_high: list[float]
    max_shift_px: list[float]  # per axis (x, y)

    @classmethod
    def from_labels(cls, ps: ParticleSet) -> Prior:
        """Amplitude and shift ranges spanned by a labelled particle set (the images HEMNMA's
        quality flag does not mark, if any)."""
        modes = amplitude_modes(ps.particles)
        if not modes:
            raise InputError(f"{ps.star}: no _dhAmplitudeMode<k> columns to take a prior from")
        rows = unflagged(ps.particles)
        if not rows.any():
            log.warning("%s: every labelled image is flagged; the prior spans them all", ps.star)
            rows = np.ones(len(ps), dtype=bool)
        amps = ps.amplitudes(modes, rows)
        return cls(
            modes,
            amps.min(0).tolist(),
            amps.max(0).tolist(),
            np.abs(ps.shifts_px(rows)).max(0).tolist(),
        )

    def draw(self, rows: np.ndarray, pixel_size: float, rng: np.random.Generator) -> pd.DataFrame:
        """Parameter table (RELION columns + amplitudes) of one image per particle row."""
        n = len(rows)
        euler = geometry.random_euler(n, rng)
        shifts = rng.uniform(-1.0, 1.0, size=(n, 2)) * np.asarray(self.max_shift_px)
        amps = rng.uniform(
            self.amplitude_low, self.amplitude_high, size=(n, len(self.mode_numbers))
        )
        table = pd.DataFrame(
            {
                "row": rows,
                **pose_columns(euler, shifts, pixel_size),
            }
        )
        for j, k in enumerate(self.mode_numbers):
            table[amplitude_column(k)] = amps[:, j]
        return table


@dataclass
class FlexibleRenderer:
    """Noise-free, CTF-affected images of a deformed model at a working box."""

    model: FlexibleModel  # torch arrays
    ps: ParticleSet  # the data set whose CTFs are used
    box: int
    sigma_angstrom: float

    @property
    def pixel_size(self) -> float:
        return self.ps.pixel_size * self.ps.box / self.box

    def render(self, params: pd.DataFrame) -> torch.Tensor:
        """(B, box, box) images of a parameter table from `Prior.draw`."""
        # no coarser than the simulator's default sampling (1.1 Å for atoms of 1 Å)
        oversample = max(1, math.ceil(self.pixel_size / (1.1 * self.sigma_angstrom)))
        cfg = simulate.SimulationSettings(
            box=self.box,
            oversample=oversample,
            pixel_size=self.pixel_size,
            sigma_angstrom=self.sigma_angstrom,
            ctf=False,
            snr=None,
        )
        clean = simulate.render(self.model, params, cfg, None)["clean"]
        if not self.ps.has_ctf:
            return clean
        rows = params["row"].to_numpy()
        c = imaging.particle_ctf(self.ps.ctf_params(), rows, self.pixel_size, self.box)
        return imaging.apply_ctf(clean, c.to(clean.dtype))


def radial_power(images: torch.Tensor) -> np.ndarray:
    """Mean power |F|² of images (n, D, D) per integer frequency shell 0 .. D // 2."""
    d = images.shape[-1]
    power = (torch.fft.fft2(images.double()).abs() ** 2).mean(0)
    f = torch.fft.fftfreq(d, d=1.0 / d, dtype=torch.float64)
    shell = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).round().long()
    keep = shell <= d // 2
    sums = torch.zeros(d // 2 + 1, dtype=torch.float64).index_add_(0, shell[keep], power[keep])
    counts = torch.bincount(shell[keep], minlength=d // 2 + 1)
    return (sums / counts).numpy()


@dataclass
class NoiseFit:
    """Real power spectrum ≈ signal_scale · synthetic clean spectrum + white noise."""

    signal_scale: float  # a
    noise_sigma: float  # per pixel at the working box
    snr: float  # mean signal variance / noise variance at the working box


def fit_noise(real: torch.Tensor, clean: torch.Tensor) -> NoiseFit:
    """Fit real images (n, w, w) as a·clean + white noise from their radial power spectra."""
    w = real.shape[-1]
    p_real, p_clean = radial_power(real)[1 : w // 2], radial_power(clean)[1 : w // 2]
    design = np.stack([p_clean, np.ones_like(p_clean)], 1)
    (a, b), *_ = np.linalg.lstsq(design, p_real, rcond=None)
    if a <= 0:
        raise InputError(
            "the particle images show no power where the model's projections have it: "
            "wrong model, box or pixel size?"
        )
    sigma = math.sqrt(max(b, 0.0)) / w
    signal = float(a * clean.double().var(dim=(-2, -1)).mean())
    return NoiseFit(float(a), sigma, signal / sigma**2 if sigma > 0 else math.inf)


def spectrum_figure(
    real: torch.Tensor, clean: torch.Tensor, fit: NoiseFit, pixel_size: float, path: Path
) -> None:
    """Radial power of real and synthetic images, and a few of each."""
    plt = pyplot()
    gen = torch.Generator().manual_seed(0)
    noisy = math.sqrt(fit.signal_scale) * clean
    noisy = noisy + fit.noise_sigma * torch.randn(noisy.shape, generator=gen, dtype=noisy.dtype)
    w = real.shape[-1]
    freq = np.arange(w // 2 + 1) / (w * pixel_size)
    fig = plt.figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.semilogy(freq[1:], radial_power(real)[1:], label="particles")
    ax.semilogy(freq[1:], radial_power(noisy)[1:], "--", label="synthetic (with noise)")
    ax.semilogy(freq[1:], fit.signal_scale * radial_power(clean)[1:], ":", label="synthetic signal")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("mean power")
    ax.set_title(f"estimated SNR {fit.snr:.3g} at {w} px")
    ax.legend()
    for i in range(4):
        for j, (img, name) in enumerate(((real, "particle"), (noisy, "synthetic"))):
            a = fig.add_subplot(2, 8, 5 + i + 8 * j)
            a.imshow(img[i].numpy(), cmap="gray")
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(name, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model.npz")
    p.add_argument("--modes", required=True, help="modes.npz")
    p.add_argument("--particles", required=True, help="all particles (STAR): CTFs and noise")
    p.add_argument("--labels", required=True, help="labelled STAR: amplitude and shift ranges")
    p.add_argument("--n-images", type=int, required=True, help="synthetic images to render")
    p.add_argument("--box", type=int, default=None, help="working box (default: the particles')")
    p.add_argument("--sigma-angstrom", type=float, default=1.0, help="atom Gaussian width (Å)")
    p.add_argument("--n-estimate", type=int, default=1000, help="images used to fit the noise")
    p.add_argument("--batch", type=int, default=64, help="images rendered at once")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", required=True, help="images.npy, labels.npz, meta.json")
    p.add_argument("--out-figure", required=True, help="power spectra and example images (PNG)")


def main(args: argparse.Namespace) -> None:
    ps = ParticleSet(require_file(args.particles, "particle STAR"))
    prior = Prior.from_labels(ParticleSet(require_file(args.labels, "label STAR")))
    model = FlexibleModel.load(args.model, args.modes)
    numbers = model.mode_numbers
    if [int(k) for k in numbers] != prior.mode_numbers:
        raise InputError(
            f"{args.labels}: amplitude modes {prior.mode_numbers} differ from "
            f"{args.modes}'s {numbers.tolist()}"
        )
    box = args.box or ps.box
    if box > ps.box:
        raise InputError(f"working box {box} is larger than the particles' box {ps.box}")
    renderer = FlexibleRenderer(model.to(), ps, box, args.sigma_angstrom)
    rng = np.random.default_rng(args.seed)
    est_rows = rng.choice(len(ps), size=min(args.n_estimate, len(ps)), replace=False)
    real = imaging.fourier_crop(torch.from_numpy(ps.images[np.sort(est_rows)]), box)
    clean = torch.cat(
        [
            renderer.render(prior.draw(est_rows[i : i + args.batch], ps.pixel_size, rng))
            for i in range(0, len(est_rows), args.batch)
        ]
    )
    fit = fit_noise(real, clean)
    log.info(
        "noise fit at %d px (%.3f Å/px) on %d images: signal scale %.4g, noise sigma %.4g, "
        "SNR %.3g",
        box, renderer.pixel_size, len(est_rows), fit.signal_scale, fit.noise_sigma, fit.snr,
    )  # fmt: skip
    spectrum_figure(real, clean, fit, renderer.pixel_size, Path(args.out_figure))

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = rng.integers(0, len(ps), size=args.n_images)
    params = prior.draw(rows, ps.pixel_size, rng)
    scale = math.sqrt(fit.signal_scale)
    with atomic_path(out / "images.npy") as tmp:
        images = np.lib.format.open_memmap(tmp, "w+", np.float32, (args.n_images, box, box))
        for i in tqdm(range(0, args.n_images, args.batch), "synthesize", mininterval=10):
            images[i : i + args.batch] = scale * renderer.render(params.iloc[i : i + args.batch])
        images.flush()
        del images
    with atomic_path(out / "labels.npz") as tmp:
        ctf = {f"ctf_{k}": v for k, v in ps.ctf_params(rows).items()} if ps.has_ctf else {}
        np.savez(tmp, **labels_of(params, ps.pixel_size, prior.mode_numbers), **ctf)
    meta = {
        "n_images": args.n_images,
        "box": box,
        "pixel_size": renderer.pixel_size,
        "particle_box": ps.box,
        "particle_pixel_size": ps.pixel_size,
        **asdict(fit),
        "prior": asdict(prior),
        "sigma_angstrom": args.sigma_angstrom,
        "seed": args.seed,
    }
    with atomic_path(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    log.info("rendered %d synthetic images -> %s", args.n_images, out)
