"""reconstruct: direct Fourier inversion of a group's images with their poses, shifts and CTFs.

Each image's DFT (its shift undone by a phase ramp, weighted by its CTF) is inserted with trilinear
weights at pad · Aᵀ(kx, ky, 0) on a 2×-oversampled 3D Fourier grid (Fourier slice theorem for
P(x, y) = ∫ V(Aᵀ(x, y, z)) dz); oversampling the volume's grid (not the images) keeps the
interpolation error small at a quarter of the cost of inserting zero-padded images. The map is
Σ CTF·F / (Σ CTF² + τ⁻²) with τ⁻² per shell from the half-maps' FSC (RELION's regularisation),
inverted, corrected for the trilinear kernel (÷ sinc²), cropped and multiplied by a soft sphere
inscribed in the box. Half-maps come from a seeded random split.
"""

from __future__ import annotations

import argparse
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import geometry, imaging
from .files import require_file
from .fsc import fsc_curve
from .io import ParticleSet
from .mrc import write_mrc

log = logging.getLogger(__name__)


class FourierAccumulator:
    """Σ CTF·F and Σ CTF² on the half (rfft) 3D Fourier grid (P, P, P // 2 + 1), P = pad × box.

    Each image's DFT samples (|k| < D/2) are placed at k = pad · Aᵀ(kx, ky, 0) on the finer grid,
    in the half-space kx ≥ 0 (as the Hermitian mirror -k with the conjugate value when kx < 0),
    with trilinear weights; the plane kx = 0 is made Hermitian when the map is computed.
    """

    def __init__(self, box: int, pad: int = 2, device=None):
        self.box, self.pad, self.p = box, pad, box * pad
        self.h = self.p // 2 + 1
        self.num = torch.zeros(self.p * self.p * self.h, dtype=torch.complex64, device=device)
        self.den = torch.zeros(self.p * self.p * self.h, device=device)
        self._dx = torch.tensor([0, 1], dtype=torch.int32, device=device)
        self._grid = self._slice_grid(device)
        self._shells: torch.Tensor | None = None

    def _slice_grid(self, device):
        """Image frequencies (K,) kept (|k| < D / 2), their rfft2 indices, and a weight ½ on kx = 0,
        whose points are listed with their mirrors."""
        d = self.box
        ky = torch.fft.fftfreq(d, 1 / d, device=device)[:, None].expand(d, d // 2 + 1)
        kx = torch.fft.rfftfreq(d, 1 / d, device=device)[None, :].expand(d, d // 2 + 1)
        keep = (kx**2 + ky**2) < (d / 2) ** 2
        half = torch.where(kx[keep] == 0, 0.5, 1.0)
        return kx[keep], ky[keep], keep.flatten().nonzero()[:, 0], half

    def insert(
        self,
        images: torch.Tensor,
        rot: torch.Tensor,
        shifts_px: torch.Tensor,
        ctf: torch.Tensor | None,
    ) -> None:
        """Add images (B, D, D) with RELION matrices (B, 3, 3), shifts (B, 2) px, CTF (B, D, D//2+1)."""
        p, d, h = self.p, self.box, self.h
        kx, ky, flat_keep, half = self._grid
        f = torch.fft.rfft2(torch.fft.ifftshift(images.float(), dim=(-2, -1)))
        f = f.flatten(1)[:, flat_keep]
        sx, sy = shifts_px.float().unbind(-1)
        f = f * torch.polar(
            torch.ones((), device=f.device),
            (2 * math.pi / d) * (kx * sx[:, None] + ky * sy[:, None]),
        )
        c = half if ctf is None else ctf.flatten(1)[:, flat_keep].float() * half
        f = f * c
        w2 = c * c / half  # CTF² (1 without a CTF), halved on kx = 0
        rot = rot.float() * self.pad
        k3 = kx[None, :, None] * rot[:, None, 0, :] + ky[None, :, None] * rot[:, None, 1, :]
        mirror = k3[..., :1] < 0  # store -k with the conjugate value
        k3 = torch.where(mirror, -k3, k3)
        f = torch.where(mirror[..., 0], f.conj(), f)
        base = torch.floor(k3)
        fx, fy, fz = (k3 - base).unbind(-1)
        base = base.int()
        x0, y0, z0 = base[..., 0], base[..., 1] % p, base[..., 2] % p
        y1, z1 = (y0 + 1) % p, (z0 + 1) % p
        # the 8 corners as 4 (z, y) rows × 2 neighbours along x, adjacent in memory
        rows = torch.stack(
            [(z0 * p + y0) * h, (z0 * p + y1) * h, (z1 * p + y0) * h, (z1 * p + y1) * h], dim=-1
        ) + x0.unsqueeze(-1)
        wzy = torch.stack([(1 - fz) * (1 - fy), (1 - fz) * fy, fz * (1 - fy), fz * fy], dim=-1)
        idx = (rows.unsqueeze(-1) + self._dx).flatten()
        wt = (wzy.unsqueeze(-1) * torch.stack([1 - fx, fx], dim=-1).unsqueeze(-2)).flatten(-2)
        self.num.index_add_(0, idx, (f.unsqueeze(-1) * wt).flatten())
        self.den.index_add_(0, idx, (w2.unsqueeze(-1) * wt).flatten())

    def add(self, other: FourierAccumulator) -> None:
        self.num += other.num
        self.den += other.den

    def _hermitian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ CTF·F complex, Σ CTF²) on (P, P, P//2+1) with the plane kx = 0 made Hermitian."""
        p = self.p
        num = self.num.reshape(p, p, self.h).clone()
        den = self.den.reshape(p, p, self.h).clone()
        flip = lambda v: torch.roll(torch.flip(v, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
        plane = num[:, :, 0]
        num[:, :, 0] = plane + flip(plane).conj()
        den[:, :, 0] = den[:, :, 0] + flip(den[:, :, 0])
        return num, den

    def shells(self) -> torch.Tensor:
        """Shell index (P, P, P//2+1) of each voxel in units of the unpadded box's shells, the
        corners beyond Nyquist in the last (D // 2); computed once."""
        if self._shells is None:
            p = self.p
            fy = torch.fft.fftfreq(p, 1 / p, device=self.den.device)
            fx = torch.fft.rfftfreq(p, 1 / p, device=self.den.device)
            r = fy[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2
            r = torch.round(torch.sqrt(r) / self.pad).clamp_max(self.box // 2)
            self._shells = r.long()
        return self._shells

    def volume(self, reg: torch.Tensor | float) -> np.ndarray:
        """The map (D, D, D) float32 [z, y, x], centre at D // 2: Σ CTF·F / (Σ CTF² + reg), reg a
        constant or per shell (D // 2 + 1 values), trilinear kernel corrected, soft-masked."""
        p, d = self.p, self.box
        num, den = self._hermitian()
        if isinstance(reg, torch.Tensor):
            reg = reg[self.shells()]
        num *= 1 / (den + reg)
        vol = torch.fft.irfftn(num, s=(p, p, p))
        # the central D³ of the fftshifted volume, taken without shifting the whole of it
        i = torch.arange(d, device=vol.device) - d // 2
        vol = vol[i % p][:, i % p][:, :, i % p]
        s = torch.sinc(i.to(vol.dtype) / p) ** 2
        vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
        return (vol * soft_sphere(d, vol.device)).float().cpu().numpy()


def soft_sphere(box: int, device=None) -> torch.Tensor:
    """(D, D, D) mask: 1 within 0.4 D of the centre, a cosine edge to 0 at 0.5 D (the box's
    inscribed sphere), so that the noise in the box's corners does not enter the map."""
    c = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) / box
    return 0.5 + 0.5 * torch.cos(math.pi * ((r - 0.4) / 0.1).clamp(0, 1))


def shell_mean(acc: FourierAccumulator) -> torch.Tensor:
    """Mean Σ CTF² per shell (D // 2 + 1 shells; the corners beyond Nyquist join the last)."""
    n = acc.box // 2 + 1
    idx = acc.shells().flatten()
    den = acc._hermitian()[1].flatten()
    return torch.zeros(n, device=den.device).index_add_(0, idx, den) / torch.bincount(
        idx, minlength=n
    ).clamp_min(1)


def reconstruct_halves(
    ps: ParticleSet,
    rows: np.ndarray,
    half: np.ndarray,
    tau2_fudge: float = 1.0,
    batch: int = 32,
    pad: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(half-map 1, half-map 2, full map) of the particle rows; `half` (n,) in {0, 1}.

    Regularised as RELION's: Σ CTF·F / (Σ CTF² + τ⁻²) with τ⁻² per shell = mean Σ CTF² / SSNR,
    the SSNR taken from the FSC of the unregularised half-maps (FSC / (1 - FSC) per half, twice
    that for the full map) times `tau2_fudge`: ≈ 0 for noise-free images, a Wiener filter for
    noisy ones, and no constant to tune against the number of images or their coverage.
    """
    acc = [FourierAccumulator(ps.box, pad) for _ in range(2)]
    params = ps.ctf_params()
    euler, shifts = ps.euler(), ps.shifts_px()
    # the two halves fill their own grids: one thread each (torch releases the GIL)
    pool = ThreadPoolExecutor(2)
    for start in tqdm(range(0, len(rows), batch), desc="reconstruct", unit="batch", mininterval=10):
        r = rows[start : start + batch]
        imgs = torch.from_numpy(ps.images[r])
        rot = geometry.euler_to_matrix(torch.tensor(euler[r], dtype=torch.float32))
        ctf = imaging.particle_ctf(params, r, ps.pixel_size, ps.box) if ps.has_ctf else None
        sh = torch.tensor(shifts[r])
        jobs = []
        for h in (0, 1):
            sel = torch.from_numpy(half[start : start + batch] == h)
            if sel.any():
                c = None if ctf is None else ctf[sel]
                jobs.append(pool.submit(acc[h].insert, imgs[sel], rot[sel], sh[sel], c))
        for j in jobs:
            j.result()
    pool.shutdown()
    means = [shell_mean(a) for a in acc]
    raw = [a.volume(1e-6 * m) for a, m in zip(acc, means, strict=True)]
    fsc = torch.from_numpy(fsc_curve(*raw)).float().clamp(1e-3, 0.9999)
    ssnr = tau2_fudge * fsc / (1 - fsc)
    maps = [a.volume(m / ssnr) for a, m in zip(acc, means, strict=True)]
    acc[0].add(acc[1])  # the full map from the sum of both halves, in place
    return maps[0], maps[1], acc[0].volume(shell_mean(acc[0]) / (2 * ssnr))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="STAR of the group (poses, shifts, CTF)")
    p.add_argument(
        "--tau2-fudge", type=float, default=1.0, help="× the SSNR from the half-maps' FSC"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the half-set split")
    p.add_argument("--batch", type=int, default=32, help="images inserted at once")
    p.add_argument(
        "--roots", nargs="*", default=[], help="extra folders the stack paths resolve against"
    )
    p.add_argument("--out-half1", required=True, help="half-map 1 (MRC)")
    p.add_argument("--out-half2", required=True, help="half-map 2 (MRC)")
    p.add_argument("--out-map", required=True, help="full map (MRC)")


def main(args: argparse.Namespace) -> None:
    ps = ParticleSet(require_file(args.particles, "group STAR"), [Path(r) for r in args.roots])
    rows = np.arange(len(ps))
    half = np.random.default_rng(args.seed).permutation(len(ps)) % 2
    h1, h2, full = reconstruct_halves(ps, rows, half, args.tau2_fudge, args.batch)
    for path, vol in ((args.out_half1, h1), (args.out_half2, h2), (args.out_map, full)):
        write_mrc(path, vol, ps.pixel_size)
    log.info(
        "reconstructed %d images (%d + %d) at %d px",
        len(ps),
        (half == 0).sum(),
        (half == 1).sum(),
        ps.box,
    )
