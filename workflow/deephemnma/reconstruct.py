"""reconstruct: direct Fourier inversion of a group's images with their poses, shifts and CTFs.

Each image is zero-padded 2×, Fourier transformed, re-centred (its shift undone by a phase ramp),
weighted by its CTF and inserted with trilinear weights on the central slice A^T (kx, ky, 0) of a
3D Fourier grid (Fourier slice theorem for P(x, y) = ∫ V(Aᵀ(x, y, z)) dz). The map is the
Wiener-style ratio Σ CTF·F / (Σ CTF² + 1/SNR), made Hermitian, inverted, corrected for the
trilinear kernel (÷ sinc²), and cropped. Half-maps come from a seeded random split.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import geometry, imaging
from .io import ParticleSet, require_file, write_mrc

log = logging.getLogger(__name__)


class FourierAccumulator:
    """Σ CTF·F and Σ CTF² on a full (P, P, P) Fourier grid in FFT index order."""

    def __init__(self, box: int, pad: int = 2, device=None):
        self.box, self.p = box, box * pad
        n = self.p**3
        self.num = torch.zeros(n, 2, dtype=torch.float32, device=device)
        self.den = torch.zeros(n, dtype=torch.float32, device=device)

    def insert(
        self,
        images: torch.Tensor,
        rot: torch.Tensor,
        shifts_px: torch.Tensor,
        ctf: torch.Tensor | None,
    ) -> None:
        """Add images (B, D, D) with RELION matrices (B, 3, 3), shifts (B, 2) px, CTF (B, P, P//2+1)."""
        p, d, dev = self.p, self.box, images.device
        lo = p // 2 - d // 2
        padded = torch.zeros(len(images), p, p, dtype=images.dtype, device=dev)
        padded[:, lo : lo + d, lo : lo + d] = images
        f = torch.fft.rfft2(torch.fft.ifftshift(padded, dim=(-2, -1)))  # (B, P, P//2+1)
        ky = torch.fft.fftfreq(p, 1 / p, device=dev)[:, None].expand(p, p // 2 + 1)
        kx = torch.fft.rfftfreq(p, 1 / p, device=dev)[None, :].expand(p, p // 2 + 1)
        keep = (kx**2 + ky**2) <= (p // 2 - 1) ** 2
        kx, ky = kx[keep], ky[keep]  # (K,)
        ramp = torch.exp(
            2j * math.pi * (kx[None] * shifts_px[:, :1] + ky[None] * shifts_px[:, 1:]) / p
        )
        val = f[:, keep] * ramp
        w = torch.ones_like(val.real) if ctf is None else ctf[:, keep].to(val.real.dtype)
        val = val * w
        k3 = (
            kx[None, :, None] * rot[:, None, 0, :] + ky[None, :, None] * rot[:, None, 1, :]
        )  # (B, K, 3) xyz
        base = torch.floor(k3)
        frac = (k3 - base).float()
        base = base.long()
        # per-axis trilinear weights and wrapped indices, combined into the 8 corners
        w_axis = [(1 - frac[..., a], frac[..., a]) for a in range(3)]
        i_axis = [(base[..., a] % p, (base[..., a] + 1) % p) for a in range(3)]
        val = torch.view_as_real(val.to(torch.complex64))  # (B, K, 2)
        w2 = (w * w).float()
        for cz in (0, 1):
            for cy in (0, 1):
                wzy = w_axis[2][cz] * w_axis[1][cy]
                izy = (i_axis[2][cz] * p + i_axis[1][cy]) * p
                for cx in (0, 1):
                    wt = wzy * w_axis[0][cx]
                    flat = (izy + i_axis[0][cx]).flatten()
                    self.num.index_add_(0, flat, (val * wt[..., None]).reshape(-1, 2))
                    self.den.index_add_(0, flat, (wt * w2).flatten())

    def volume(self, wiener_snr: float) -> np.ndarray:
        """The reconstructed map (D, D, D) as float32, [z, y, x], centre at D // 2."""
        p, d = self.p, self.box
        num = torch.view_as_complex(self.num).reshape(p, p, p)
        den = self.den.reshape(p, p, p)
        flip = lambda v: torch.roll(torch.flip(v, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
        num = num + flip(num).conj()  # each image gave only half of its (Hermitian) slice
        den = den + flip(den)
        vol = torch.fft.fftshift(torch.fft.ifftn(num / (den + 1.0 / wiener_snr)).real)
        c = (torch.arange(p, dtype=vol.dtype, device=vol.device) - p // 2) / p
        s = torch.sinc(c) ** 2
        vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
        lo = p // 2 - d // 2
        return vol[lo : lo + d, lo : lo + d, lo : lo + d].float().cpu().numpy()


def model_map(
    coords: np.ndarray, weights: np.ndarray, box: int, pixel_size: float, sigma_angstrom: float
) -> np.ndarray:
    """Density (D, D, D) [z, y, x] of Gaussian atoms, centre at D // 2 (matches the projector)."""
    x = torch.tensor(coords, dtype=torch.float64) / pixel_size + box // 2
    g = torch.arange(box, dtype=torch.float64)
    s = sigma_angstrom / pixel_size
    gx, gy, gz = (torch.exp(-((g - x[:, i : i + 1]) ** 2) / (2 * s * s)) for i in range(3))
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    vol = (gz * w).T @ (gy[:, :, None] * gx[:, None, :]).reshape(len(x), -1)
    return (vol.reshape(box, box, box) / ((2 * math.pi) ** 1.5 * sigma_angstrom**3)).float().numpy()


def reconstruct_halves(
    ps: ParticleSet, rows: np.ndarray, half: np.ndarray, wiener_snr: float, batch: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(half-map 1, half-map 2, full map) of the particle rows; `half` (n,) in {0, 1}."""
    acc = [FourierAccumulator(ps.box), FourierAccumulator(ps.box)]
    params = ps.ctf_params()
    euler, shifts = ps.euler(), ps.shifts_px()
    p = acc[0].p
    for start in tqdm(range(0, len(rows), batch), desc="reconstruct", unit="batch", mininterval=10):
        r = rows[start : start + batch]
        imgs = torch.from_numpy(ps.images[r])
        rot = geometry.euler_to_matrix(torch.tensor(euler[r], dtype=torch.float32))
        ctf = imaging.particle_ctf(params, r, ps.pixel_size, p) if ps.has_ctf else None
        for h in (0, 1):
            sel = half[start : start + batch] == h
            if sel.any():
                acc[h].insert(
                    imgs[sel],
                    rot[sel],
                    torch.tensor(shifts[r][sel]),
                    None if ctf is None else ctf[sel],
                )
    maps = [a.volume(wiener_snr) for a in acc]
    acc[0].num += acc[1].num  # the full map from the sum of both halves, in place
    acc[0].den += acc[1].den
    return maps[0], maps[1], acc[0].volume(wiener_snr)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="STAR of the group (poses, shifts, CTF)")
    p.add_argument("--wiener-snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--roots", nargs="*", default=[], help="extra folders the stack paths resolve against"
    )
    p.add_argument("--out-half1", required=True)
    p.add_argument("--out-half2", required=True)
    p.add_argument("--out-map", required=True)


def main(args: argparse.Namespace) -> None:
    ps = ParticleSet(require_file(args.particles, "group STAR"), [Path(r) for r in args.roots])
    rows = np.arange(len(ps))
    half = np.random.default_rng(args.seed).permutation(len(ps)) % 2
    h1, h2, full = reconstruct_halves(ps, rows, half, args.wiener_snr, args.batch)
    for path, vol in ((args.out_half1, h1), (args.out_half2, h2), (args.out_map, full)):
        write_mrc(path, vol, ps.pixel_size)
    log.info(
        "reconstructed %d images (%d + %d) at %d px",
        len(ps),
        (half == 0).sum(),
        (half == 1).sum(),
        ps.box,
    )
