"""views: what the reference looks like at a pose — the extra input of the pose-conditioned
amplitude network.

A network that sees only the image must learn, for every view of the molecule, how each mode
changes the projection; at a 32-px working box and a few thousand images it barely beats the mean.
Given the pose (from the angle and shift networks, or the labels while training), it can instead
be shown, next to the image, the reference's projection at that pose and how that projection
changes along each mode: channels [P(0), P(h₁e₁) − P(0), …, P(h_K e_K) − P(0)] (h_k: one step per
mode), all with the image's CTF and scaled by P(0)'s standard deviation. Estimating amplitudes then
looks like the fixed-view task a small network learns well.

The K + 1 densities are computed once (Gaussian atoms, oversampled and Fourier-cropped to the
working box like the simulator's images) and projected by central slices of their Fourier
transforms (torch-fourier-slice): RELION's matrix A projects along z after rotating by A, so the
slice is taken with Aᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch_fourier_slice import project_3d_to_2d_multichannel

from . import geometry, imaging
from .flexible import FlexibleModel
from .nets import transform_images

ATOM_CHUNK = 512  # atoms per density pass: bounds memory to ATOM_CHUNK × (box·oversample)² floats


def density(
    coords: torch.Tensor, weights: torch.Tensor, box: int, pixel_size: float, sigma: float
) -> torch.Tensor:
    """Density (box, box, box) [z, y, x] of Gaussian atoms (`imaging.density`), sampled finely
    enough for the atoms (≤ 1.1 σ per voxel), ATOM_CHUNK atoms at a time, Fourier-cropped to
    `box` (`imaging.fourier_crop_volume`)."""
    over = max(1, math.ceil(pixel_size / (1.1 * sigma)))
    big, step = box * over, pixel_size / over
    vol = sum(
        imaging.density(coords[i : i + ATOM_CHUNK], weights[i : i + ATOM_CHUNK], big, step, sigma)
        for i in range(0, len(coords), ATOM_CHUNK)
    )
    return imaging.fourier_crop_volume(vol, box)


def perturb_poses(
    euler: np.ndarray, shifts_px: np.ndarray, sigma_deg: float, sigma_px: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Poses moved as an estimate would be wrong: each rotation by an angle |N(0, sigma_deg)|
    about a random axis, each shift by N(0, sigma_px) per axis (training the amplitude network
    on such views makes it robust to the angle and shift networks' errors)."""
    rng = np.random.default_rng(seed)
    n = len(euler)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = np.radians(np.abs(rng.normal(0.0, sigma_deg, n)))
    turn = Rotation.from_rotvec(axis * angle[:, None]).as_matrix()
    rot = turn @ geometry.euler_to_matrix(np.asarray(euler, dtype=np.float64))
    return geometry.matrix_to_euler(rot), shifts_px + rng.normal(0.0, sigma_px, (n, 2))


def shift_images(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Images (B, ..., D, D) moved by (x, y) shifts (B, 2) in pixels (Fourier phase ramp)."""
    box = images.shape[-1]
    ky = torch.fft.fftfreq(box, device=images.device)[:, None]
    kx = torch.fft.rfftfreq(box, device=images.device)[None, :]
    s = shifts_px.float().reshape(len(shifts_px), *[1] * (images.dim() - 3), 2)
    phase = torch.exp(-2j * math.pi * (kx * s[..., 0, None, None] + ky * s[..., 1, None, None]))
    return torch.fft.irfft2(torch.fft.rfft2(images) * phase, s=(box, box))


def transform_views(
    views: torch.Tensor, quarter_turns: torch.Tensor, t_px: torch.Tensor
) -> torch.Tensor:
    """Views (B, C, d, d) moved as `transform_images` moves their images: the same quarter
    turns about d // 2, then shifts t_px (B, 2) in pixels of the views' box (a Fourier phase:
    fractional when the views' box is smaller than the images'; skipped when all are zero, as at
    inference's test-time turns)."""
    b, c, d = views.shape[:3]
    zero = torch.zeros(b * c, 2, device=views.device)
    turned = transform_images(views.reshape(b * c, d, d), quarter_turns.repeat_interleave(c), zero)
    turned = turned.reshape(b, c, d, d)
    return shift_images(turned, t_px) if t_px.any() else turned


@dataclass
class ModeViews:
    """Densities of the reference and of its deformation by one step along each mode."""

    volumes: torch.Tensor  # (K + 1, box, box, box): V(0), V(h_k e_k)
    pixel_size: float  # Å per voxel (the working box's)

    @classmethod
    def from_model(
        cls,
        model: FlexibleModel,
        steps: np.ndarray,
        box: int,
        pixel_size: float,
        sigma_angstrom: float = 1.0,
    ) -> ModeViews:
        """From a flexible model and one amplitude step per mode (K,)."""
        f64 = lambda a: np.asarray(a, dtype=np.float64)
        m = replace(model, coords=f64(model.coords), modes=f64(model.modes))
        moved = [m.coords] + [m.deform(a) for a in np.diag(f64(steps))]
        w = torch.as_tensor(f64(model.weights))
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)
        vols = [density(t(x), w, box, pixel_size, sigma_angstrom) for x in moved]
        return cls(torch.stack(vols).float(), pixel_size)

    def of_particles(
        self,
        euler: np.ndarray,
        shifts_px: np.ndarray,
        particle_box: int,
        ctf_params: dict | None,
        rows: np.ndarray,
        device=None,
    ) -> torch.Tensor:
        """`render` for particles `rows`: Euler angles (n, 3) and shifts (n, 2) in pixels of the
        particles' box (indexed by position in `rows`' batch), CTFs from
        `ParticleSet.ctf_params()` arrays (None: no CTF)."""
        box = self.volumes.shape[-1]
        ctf = None
        if ctf_params is not None:
            ctf = imaging.particle_ctf(ctf_params, rows, self.pixel_size, box, device)
        euler = torch.as_tensor(euler, device=device)
        shifts = torch.as_tensor(shifts_px * box / particle_box, device=device)
        return self.render(euler, shifts, ctf)

    def render(
        self, euler: torch.Tensor, shifts_px: torch.Tensor, ctf: torch.Tensor | None
    ) -> torch.Tensor:
        """Channels (B, K + 1, box, box) at RELION Euler angles (B, 3) degrees and shifts (B, 2)
        in pixels of the working box, times the CTFs (B, box, box // 2 + 1) when given."""
        vol = self.volumes.to(euler.device)
        rot = geometry.euler_to_matrix(euler.double()).float().transpose(-1, -2)
        proj = project_3d_to_2d_multichannel(vol, rot) * self.pixel_size  # (B, C, box, box)
        views = shift_images(proj, shifts_px)
        if ctf is not None:
            views = imaging.apply_ctf(views, ctf[:, None].to(views.dtype))
        views = torch.cat([views[:, :1], views[:, 1:] - views[:, :1]], 1)
        return views / views[:, :1].std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
