"""Imaging core: Gaussian projector and densities of atomic models, RELION CTF, Fourier
cropping, noise.

Conventions (docs/protocol.md): arrays are ``img[..., y, x]``; the box centre is index D // 2; a model
point r (Å, centred) seen with RELION matrix A lands at (A r)[:2] / pixel_size + shift (pixels from
the centre). Particles are white on dark; the CTF is RELION's (positive at low frequency).
All functions take torch tensors with leading batch dimensions and run on the tensors' device.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
from torch_ctf import calculate_ctf_2d

# exp() of arguments below about -88 takes a slow denormal path in float32; nothing below matters
_EXP_FLOOR = -60.0
# the projector evaluates each atom's Gaussian this many widths around it
FOOTPRINT_SIGMAS = 4.0
CPU_CHUNK = 2**20  # footprint values per projector call on the CPU
GPU_CHUNK = 2**26  # and on a GPU (≈ 0.8 GB of values and indices)


def _footprint_index(corner: torch.Tensor, size: int, width: int) -> torch.Tensor:
    """Flat pixel indices (B, N·W²) of the W × W footprints whose first pixels are `corner`
    (B, N, 2: x, y) in an image of size × size."""
    offsets = torch.arange(width, device=corner.device)
    pattern = (offsets[:, None] * size + offsets[None, :]).flatten()
    return ((corner[..., 1] * size + corner[..., 0])[..., None] + pattern).flatten(1)


class _FootprintSplat(torch.autograd.Function):
    """Images (B, box, box) of separable Gaussians at pixel positions `pos` (B, N, 2) with
    weights `w` (B, N), each evaluated on its footprint of 2 * half pixels per axis; the
    gradient flows to the positions only.

    Footprints are added into an image padded by 2 * half on each side; an atom whose footprint
    would leave the padded image lies wholly outside the box, so it is clamped into the margin.
    An image with a non-finite position is NaN.
    """

    @staticmethod
    def forward(ctx, pos, w, box: int, sigma_px: float, half: int):
        width, pad = 2 * half, 2 * half
        size = box + 2 * pad
        start = torch.floor(pos) - (half - 1)  # (B, N, 2): first pixel of each footprint
        offsets = torch.arange(width, device=pos.device, dtype=pos.dtype)
        d = start[..., None] + offsets - pos[..., None]  # (B, N, 2, W) pixel - atom
        g = torch.exp((d * d * (-0.5 / sigma_px**2)).clamp_min(_EXP_FLOOR))
        vals = (g[:, :, 1, :, None] * w[..., None, None]) * g[:, :, 0, None, :]  # [y, x]
        corner = torch.nan_to_num(start + pad, nan=0.0).clamp(0, size - width).long()
        flat = _footprint_index(corner, size, width)
        img = pos.new_zeros(len(pos), size * size).scatter_add_(1, flat, vals.flatten(1))
        img = img.view(-1, size, size)[:, pad : pad + box, pad : pad + box].contiguous()
        img[~torch.isfinite(pos).flatten(1).all(1)] = math.nan
        ctx.save_for_backward(corner, g, d, w)
        ctx.sigma_px, ctx.pad = sigma_px, pad
        return img

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        corner, g, d, w = ctx.saved_tensors
        b, n, _, width = g.shape
        grad = torch.nn.functional.pad(grad, (ctx.pad,) * 4)
        flat = _footprint_index(corner, grad.shape[-1], width)
        near = grad.flatten(1).gather(1, flat).view(b, n, width, width)  # [y, x] near each atom
        tx = (g[:, :, 1, None, :] @ near)[:, :, 0]  # Σ_y gy · grad: (B, N, W) along x
        ty = (near @ g[:, :, 0, :, None])[..., 0]  # Σ_x grad · gx: along y
        dpos = (torch.stack([tx, ty], 2) * g * d).sum(-1) * (w[..., None] / ctx.sigma_px**2)
        return dpos, None, None, None, None


def projected_positions(
    coords: torch.Tensor,
    rotation: torch.Tensor,
    shift_px: torch.Tensor,
    box: int,
    pixel_size: float,
) -> torch.Tensor:
    """Pixel index coordinates (B, N, 2: x, y) of model points (B, N, 3) or (N, 3), Å, seen
    with RELION matrices `rotation` (B, 3, 3) and displaced by `shift_px` (B, 2)."""
    xy = torch.matmul(coords, rotation.transpose(-1, -2)[..., :2])  # (B, N, 2) Å
    return xy / pixel_size + shift_px[:, None, :] + box // 2


def project(
    coords: torch.Tensor,
    rotation: torch.Tensor,
    shift_px: torch.Tensor,
    weights: torch.Tensor,
    box: int,
    pixel_size: float,
    sigma_angstrom: float,
) -> torch.Tensor:
    """Projections (B, box, box) of atomic models by Gaussian splatting.

    Parameters
    ----------
    coords : (B, N, 3) or (N, 3) model coordinates in Å, centred.
    rotation : (B, 3, 3) RELION matrices A.
    shift_px : (B, 2) particle displacement (x, y) in pixels.
    weights : (N,) or (B, N) scattering weights (no gradient flows to them).
    sigma_angstrom : width of each atom's Gaussian in Å.

    Each atom integrates to its weight per Å², so values do not depend on the pixel size. Each
    atom's Gaussian is evaluated on a square footprint reaching ≥ FOOTPRINT_SIGMAS σ on every
    side (beyond it the Gaussian is below exp(-8) of its peak) and added in by scatter-add: the
    cost grows with the atoms, not with the box.
    """
    pos = projected_positions(coords, rotation, shift_px, box, pixel_size)
    sigma_px = sigma_angstrom / pixel_size
    half = math.ceil(FOOTPRINT_SIGMAS * sigma_px) + 1
    if weights.requires_grad:
        raise ValueError("the projector gives no gradient to the atoms' weights")
    w = (weights if weights.dim() == 2 else weights[None]).expand(len(pos), -1).to(pos.dtype)
    # a few images at a time: on the CPU the footprints stay in cache (2-3x faster); on a GPU
    # the memory of a call stays bounded
    budget = CPU_CHUNK if pos.device.type == "cpu" else GPU_CHUNK
    step = max(1, budget // (pos.shape[1] * 4 * half**2))
    parts = [
        _FootprintSplat.apply(pos[i : i + step], w[i : i + step], box, sigma_px, half)
        for i in range(0, max(len(pos), 1), step)  # an empty batch gives (0, box, box)
    ]
    img = parts[0] if len(parts) == 1 else torch.cat(parts)
    return img / (2.0 * math.pi * sigma_angstrom**2)


def widen_gaussians(
    box: int, pixel_size: float, sigma_from: float, sigma_to: float, device=None
) -> torch.Tensor:
    """Filter on the rfft grid (box, box // 2 + 1) that turns Gaussian atoms of width
    `sigma_from` into width `sigma_to` (Å): exp(-2π² (sigma_to² - sigma_from²) |s|²)."""
    s2 = frequency_squared(box, pixel_size, device)
    return torch.exp(-2 * math.pi**2 * (sigma_to**2 - sigma_from**2) * s2)


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å."""
    v = voltage_kv * 1e3
    return 12.2642598 / math.sqrt(v * (1 + 0.978466e-6 * v))


def ctf(
    defocus_u: torch.Tensor,
    defocus_v: torch.Tensor,
    defocus_angle_deg: torch.Tensor,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    pixel_size: float,
    box: int,
    phase_shift_deg: torch.Tensor | float = 0.0,
    bfactor: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """RELION CTF on the rfft grid (B, box, box // 2 + 1); defocus in Å, positive = underfocus.

    The defocus angle is RELION's: from the x axis to the direction of defocus U. Computed with
    torch-ctf (whose angle, despite its docstring, is measured from x as RELION's). B-factor: envelope exp(-B s² / 4).
    """
    defocus_u = torch.as_tensor(defocus_u, dtype=torch.float32)
    defocus_v = torch.as_tensor(defocus_v, dtype=defocus_u.dtype, device=defocus_u.device)
    angle = torch.as_tensor(defocus_angle_deg, dtype=defocus_u.dtype, device=defocus_u.device)
    phase = torch.as_tensor(phase_shift_deg, dtype=defocus_u.dtype, device=defocus_u.device)
    c = calculate_ctf_2d(
        defocus=(defocus_u + defocus_v) / 2e4,
        astigmatism=(defocus_u - defocus_v) / 2e4,
        astigmatism_angle=angle,
        voltage=voltage_kv,
        spherical_aberration=cs_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift=phase,
        pixel_size=pixel_size,
        image_shape=(box, box),
        rfft=True,
        fftshift=False,
    )
    bfactor = torch.as_tensor(bfactor, dtype=c.dtype, device=c.device)
    if bool((bfactor != 0).any()):
        s2 = frequency_squared(box, pixel_size, c.device)
        c = c * torch.exp(-bfactor.reshape(-1, 1, 1) * s2 / 4.0)
    return c


def particle_ctf(params: dict, rows, pixel_size: float, box: int, device=None) -> torch.Tensor:
    """CTFs (n, box, box // 2 + 1) of particle `rows` from ``ParticleSet.ctf_params()`` arrays
    (per-particle defocus, phase shift and B-factor; one voltage, Cs and amplitude contrast)."""
    t = lambda key: torch.tensor(params[key][rows], dtype=torch.float32, device=device)
    first = lambda key: float(params[key][rows][0])
    return ctf(
        t("defocus_u"),
        t("defocus_v"),
        t("defocus_angle"),
        first("voltage_kv"),
        first("cs_mm"),
        first("amplitude_contrast"),
        pixel_size,
        box,
        phase_shift_deg=t("phase_shift"),
        bfactor=t("bfactor"),
    )


def frequency_squared(box: int, pixel_size: float, device=None) -> torch.Tensor:
    """|s|² in Å⁻² on the rfft grid (box, box // 2 + 1)."""
    fy = torch.fft.fftfreq(box, d=pixel_size, device=device)
    fx = torch.fft.rfftfreq(box, d=pixel_size, device=device)
    return fy[:, None] ** 2 + fx[None, :] ** 2


def apply_ctf(images: torch.Tensor, ctf_rfft: torch.Tensor) -> torch.Tensor:
    """Multiply images (..., D, D) by a CTF given on the rfft grid (..., D, D // 2 + 1)."""
    box = images.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(images) * ctf_rfft, s=(box, box))


def fourier_crop(images: torch.Tensor, box: int) -> torch.Tensor:
    """Fourier-crop images (..., D, D) to (..., box, box), keeping pixel values (the mean).

    Keeps the frequencies -box // 2 ... (box - 1) // 2 of each axis (as centring the spectrum
    and cutting it out does); computed on the rfft grid.
    """
    big = images.shape[-1]
    if box == big:
        return images
    if box > big:
        raise ValueError(f"cannot Fourier-crop a {big}-pixel image to {box} pixels")
    h = box // 2
    f = torch.fft.rfft2(images)[..., : h + 1]
    crop = torch.cat([f[..., : h + box % 2, :], f[..., big - h :, :]], -2)
    if box % 2 == 0:
        # frequency h is kept as -h only: the real image of the kept spectrum is that of the
        # average of rows -h and +h, and at the corner (-h, -h) of the real part of F(h, h)
        crop[..., h, :] = (crop[..., h, :] + f[..., h, :]) / 2
        crop[..., h, h] = f[..., h, h]
    return torch.fft.irfft2(crop, s=(box, box)) * (box / big) ** 2


def density(
    coords: torch.Tensor, weights: torch.Tensor, box: int, pixel_size: float, sigma_angstrom: float
) -> torch.Tensor:
    """Density (D, D, D) [z, y, x] of Gaussian atoms at `coords` (N, 3) Å, centre at D // 2
    (matches the projector); differentiable in the coordinates."""
    x = coords / pixel_size + box // 2
    g = torch.arange(box, dtype=coords.dtype, device=coords.device)
    s = sigma_angstrom / pixel_size
    gx, gy, gz = (torch.exp(-((g - x[:, i : i + 1]) ** 2) / (2 * s * s)) for i in range(3))
    vol = (gz * weights[:, None]).T @ (gy[:, :, None] * gx[:, None, :]).reshape(len(x), -1)
    return vol.reshape(box, box, box) / ((2 * math.pi) ** 1.5 * sigma_angstrom**3)


def fourier_crop_volume(volume: torch.Tensor, box: int) -> torch.Tensor:
    """Fourier-crop a volume (D, D, D) to (box, box, box), keeping the voxel values' scale."""
    big = volume.shape[-1]
    if box >= big:
        return volume
    f = torch.fft.fftshift(torch.fft.fftn(volume), dim=(-3, -2, -1))
    lo = big // 2 - box // 2
    f = f[..., lo : lo + box, lo : lo + box, lo : lo + box]
    out = torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-3, -2, -1)), dim=(-3, -2, -1)).real
    return out * (box / big) ** 3


def add_noise(images: torch.Tensor, snr: float, generator: torch.Generator) -> torch.Tensor:
    """Add white Gaussian noise so that var(image) / var(noise) = snr, image by image."""
    var = images.var(dim=(-2, -1), keepdim=True)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return images + noise * torch.sqrt(var / snr)


def circular_mask(box: int, radius: float, device=None) -> torch.Tensor:
    """Boolean (box, box) disc of `radius` pixels around the centre D // 2."""
    c = torch.arange(box, device=device) - box // 2
    return c[:, None] ** 2 + c[None, :] ** 2 <= radius**2
