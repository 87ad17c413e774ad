"""hemnma: elastic 3D-to-2D alignment of particle images with a normal-mode-flexible atomic model.

Per image it estimates normal-mode amplitudes, three Euler angles and two shifts, in two steps,
batched over images, identical on CPU and GPU:

1. global search: every image (Fourier-cropped to a coarse box) is correlated with a gallery of
   CTF-affected projections, on a near-uniform SO(3) grid, of the undeformed model and of the model
   deformed by ± `gallery_amplitude` along each mode; all integer translations within the search
   radius are scored in Fourier space (phase ramps) as one matrix product; the best few
   well-separated orientations are kept, with the amplitudes of the gallery model that matched;
2. local refinement: amplitudes, a small rotation and the shift of each candidate are optimised by
   Adam on the normalised, CTF-aware correlation, first at the coarse box for all candidates, then
   at the full box for the best one. At the coarse box the model is its pseudo-atoms (the atoms
   merged per cube of `coarse_cell` coarse pixels, `FlexibleModel.coarsened`: 1.4 × faster
   alignment, the same answers as measured); at the full box, pseudo-atoms per cube of
   `full_cell` full-box pixels, at most `coarse_cell`'s cube (at 64 px 1,204 of AK's 1,656 atoms,
   0.3 Å of spread at a 5 Å resolution limit); the gallery and the ranking of the coarse
   candidates use the atoms.

Local mode (`start` = priors | network) skips step 1: each image starts from a given pose (the
consensus refinement's priors `_rlnAngleRotPrior`..., or the pose and amplitude columns of a
network's inferred STAR), optionally also from its 180° in-plane flip and from the angle
network's other orientation candidates (`_dhAngleCandidate<j>*`); each start takes, of its
amplitudes and those ± `gallery_amplitude` along each mode, the ones that correlate best there;
step 2 then runs as above with the rotation kept within `local_max_angle_deg` of its start and
the shift within `local_max_shift_px` (projected after every step), its coarse stage on coarser
pseudo-atoms (`local_coarse_cell`: a start near the answer needs less detail than a search's
candidates). With `--escalate`, the fraction of images left with the highest cost is aligned
again by the global search.

The cost of each image is 1 - (final normalised correlation); under MPI, ranks split the images.

Several references (e.g. every known state, each with its own modes) may be given: the later ones
are superposed on the first over their shared CA atoms, every image is aligned against each, and it
keeps the one with the lowest refined objective (`dhReference`, 1-based); its amplitudes are then
projected (least squares over the shared atoms) on the first reference's modes, one common space.
An optional Gaussian prior on the amplitudes (std ∝ 1/√eigenvalue) turns the refinement into a
MAP estimate: the data term is then the profile Gaussian log-likelihood (M/2)·log(1 - NCC²).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import geometry, imaging
from .files import InputError
from .flexible import FlexibleModel
from .io import (
    POSE_COLUMNS,
    ParticleSet,
    amplitude_column,
    candidate_columns,
    candidate_numbers,
    pose_columns,
    table_euler,
    table_shifts_px,
    write_star,
)
from .relion import PRIOR

log = logging.getLogger(__name__)

SEARCH_CHUNK_CPU = 8  # images per global-search product on a CPU (≈ 90 MB each by default)


@dataclass
class AlignSettings:
    """Search and refinement settings (defaults suit 64-128 px images of a ~50-70 Å protein)."""

    coarse_box: int = 32
    coarse_cell: float = 0.7  # coarse refinement on pseudo-atoms per cube of this edge (coarse
    # pixels); 0: on the atoms
    full_cell: float = 1.0  # and the full-box refinement, per cube of this edge (full-box
    # pixels), at most `coarse_cell`'s cube
    n_directions: int = 400
    psi_step: float = 10.0
    candidates: int = 4
    retry: float = 0.05  # global search: share of images (highest cost) searched again
    retry_candidates: int = 16  # candidates of that second search
    gallery_amplitude: float = 100.0  # gallery models: undeformed and ± this along each mode
    min_separation_deg: float = 20.0
    max_shift_px: float = 6.0  # search window, pixels of the full box
    iterations: tuple[int, int] = (40, 60)
    batch: int | None = None  # images aligned at once; None: 32 on a CPU, 128 on a GPU
    sigma_angstrom: float = 1.0
    lr_amplitude: float = 6.0
    lr_rotation: float = 0.02  # radians
    lr_shift: float = 0.3  # pixels of the full box
    amplitude_prior: float = 0.0  # prior std of the softest mode (amplitude units); 0: no prior
    start: str = "search"  # search (global) | priors | network (local, from a given pose)
    local_max_angle_deg: float = 25.0  # local mode: rotation kept this close to the start
    local_max_shift_px: float = 3.0  # local mode: shift kept this close to the start
    local_iterations: tuple[int, int] = (25, 25)
    local_lr_amplitude: float = 12.0  # local mode: fewer iterations, larger amplitude steps
    local_flip: bool = False  # local mode: also start from the 180° in-plane flip
    local_starts: int = 3  # local mode: amplitude starts per orientation (best of the gallery's)
    local_prune_after: int = 6  # local mode: coarse iterations before only the best start goes on
    local_retry: float = 0.1  # local mode: share of images (highest cost) redone from more
    # amplitude starts (`local_retry_starts`), unpruned
    local_coarse_cell: float = 1.4  # local mode: its coarse stage's cube (coarse pixels), when
    # that stage's box is below the full box

    @property
    def local_pruned(self) -> bool:
        """Whether local refinement prunes its amplitude starts: several of them (which needs
        gallery models) and more coarse iterations than `local_prune_after`."""
        several = self.local_starts > 1 and self.gallery_amplitude > 0
        return several and self.local_iterations[0] > self.local_prune_after

    def local_retry_starts(self, n_modes: int) -> int:
        """Amplitude starts of the local retry: the best-correlating 3 × `local_starts` of the
        2K + 1 the gallery's models give (all 7 for 3 modes); 1 without gallery models."""
        if self.gallery_amplitude <= 0:
            return 1
        return min(3 * self.local_starts, 2 * n_modes + 1)

    def local_retry_helps(self, n_modes: int) -> bool:
        """Whether the local retry refines differently from the first pass: more starts, or
        its starts unpruned."""
        more = self.local_retry_starts(n_modes) > min(self.local_starts, 2 * n_modes + 1)
        return self.local_pruned or more


START_MODES = ("search", "priors", "network")


@dataclass
class Start:
    """Starting values of local refinement: euler (B, 3) degrees, shifts_px (B, 2) particle
    displacements in pixels, amplitudes (B, K) on the first reference's modes; optionally more
    orientations to start from as well, candidates (B, C, 3) degrees (an angle network's)."""

    euler: np.ndarray
    shifts_px: np.ndarray
    amplitudes: np.ndarray
    candidates: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Start:
        more = None if self.candidates is None else self.candidates[rows]
        return Start(self.euler[rows], self.shifts_px[rows], self.amplitudes[rows], more)


def read_start(ps: ParticleSet, mode: str, mode_numbers: Sequence[int]) -> Start:
    """The starting values of local mode `mode` from a particle set.

    priors: RELION's consensus pose, which `deephemnma import` keeps (RELION 3.0 and 3.1 alike) as
    `_rlnAngle{Rot,Tilt,Psi}Prior` and `_rlnOrigin{X,Y}PriorAngst`; amplitudes start at zero.
    network: the pose, shift and amplitude columns (`_rlnAngleRot`..., `_dhAmplitudeMode<k>`) of
    a STAR written by infer/merge, and the angle network's orientation candidates where it has
    them (`_dhAngleCandidate<j>*`). InputError naming the file and the missing columns otherwise.
    """
    k = len(mode_numbers)
    if mode == "priors":
        cols = list(PRIOR.values())
    elif mode == "network":
        cols = POSE_COLUMNS + [amplitude_column(int(m)) for m in mode_numbers]
    else:
        raise ValueError(f"no start values for mode {mode!r}")
    missing = [c for c in cols if c not in ps.particles.columns]
    if missing:
        raise InputError(
            f"{ps.star}: --start {mode} needs column(s) {', '.join('_' + c for c in missing)}"
        )
    pose = ps.particles
    if mode == "priors":  # the consensus pose, under the pose columns' names
        pose = pose.drop(columns=POSE_COLUMNS, errors="ignore")
        pose = pose.rename(columns={prior: c for c, prior in PRIOR.items()})
    n = len(pose)
    amplitudes = pose[cols[5:]].to_numpy(np.float64) if mode == "network" else np.zeros((n, k))
    more = candidate_numbers(pose, ps.star) if mode == "network" else []
    candidates = None
    if more:
        columns = [c for j in more for c in candidate_columns(j)]
        candidates = pose[columns].to_numpy(np.float64).reshape(n, len(more), 3)
    return Start(table_euler(pose), table_shifts_px(pose, ps.pixel_size), amplitudes, candidates)


def local_candidates(start: Start, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates (B, C, ·) around the start: the start itself, with `flip` its 180° in-plane
    flip (same projection direction, ψ + 180°), then the start's other orientations
    (`start.candidates`); every candidate keeps the start's shift and amplitudes."""
    eul = start.euler[:, None]
    if flip:
        eul = np.concatenate([eul, eul + np.array([0.0, 0.0, 180.0])], 1)
    if start.candidates is not None:
        eul = np.concatenate([eul, start.candidates], 1)
    c = eul.shape[1]
    return (
        eul,
        np.repeat(start.shifts_px[:, None], c, 1),
        np.repeat(start.amplitudes[:, None], c, 1),
    )


@dataclass
class Bound:
    """Local-mode limits: rotation within `max_angle_deg` of the anchor rotation (|ω| bound) and
    shift within `max_shift_px` of `shift_center` (B, 2), full-box pixels."""

    max_angle_deg: float
    max_shift_px: float
    shift_center: torch.Tensor


def shared_atoms(a: FlexibleModel, b: FlexibleModel) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into a, into b) of the atoms with the same label in both references."""
    if len(a.atom_ids) != len(a.coords) or len(b.atom_ids) != len(b.coords):
        raise InputError("several references need model.npz files with atom labels (prepare-model)")
    index = {label: i for i, label in enumerate(b.atom_ids)}
    pairs = np.array([(i, index[x]) for i, x in enumerate(a.atom_ids) if x in index], dtype=int)
    if len(pairs) < 3:
        raise InputError("references share fewer than 3 atoms: they are not the same molecule")
    return pairs[:, 0], pairs[:, 1]


def superpose(mobile: FlexibleModel, target: FlexibleModel) -> FlexibleModel:
    """`mobile` rigidly moved (coordinates and modes) onto `target` over their shared CA atoms
    (all shared atoms when fewer than 3 CA atoms are shared)."""
    i, j = shared_atoms(target, mobile)
    ca = np.char.endswith(target.atom_ids[i].astype(str), ":CA")
    if ca.sum() >= 3:
        i, j = i[ca], j[ca]
    p, q = mobile.coords[j], target.coords[i]
    u, _, vt = np.linalg.svd((p - p.mean(0)).T @ (q - q.mean(0)))
    rot = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt  # x -> x @ rot
    coords = (mobile.coords - p.mean(0)) @ rot + q.mean(0)
    return replace(mobile, coords=coords, modes=mobile.modes @ rot)


def common_amplitudes(
    references: list[FlexibleModel], reference: np.ndarray, amplitudes: np.ndarray
) -> np.ndarray:
    """(B, K) amplitudes on the first reference's modes of each image's fitted structure.

    Image b fitted reference r = `reference[b]` with `amplitudes[b]` (its own modes); its
    structure is projected by least squares on the first reference's modes over their shared atoms.
    """
    first = references[0]
    out = amplitudes.copy()
    for r, ref in enumerate(references[1:], start=1):
        sel = reference == r
        if not sel.any():
            continue
        i, j = shared_atoms(first, ref)
        x = ref.atoms(j).deform(amplitudes[sel])
        basis = first.modes[:, i].reshape(len(first.modes), -1).T  # (3M, K)
        rhs = (x - first.coords[i][None]).reshape(len(x), -1).T
        out[sel] = np.linalg.lstsq(basis, rhs, rcond=None)[0].T
    return out


def load_references(models: list[str], modes: list[str]) -> list[FlexibleModel]:
    """References from paired model/modes files; later ones superposed on the first."""
    if len(models) != len(modes):
        raise InputError(f"{len(models)} model files but {len(modes)} modes files")
    refs = [FlexibleModel.load(m, k) for m, k in zip(models, modes, strict=True)]
    if len({len(r.modes) for r in refs}) > 1:
        raise InputError("references have different numbers of modes")
    return refs[:1] + [superpose(r, refs[0]) for r in refs[1:]]


def prior_std(eigenvalues: np.ndarray, scale: float) -> np.ndarray:
    """Per-mode prior std: `scale` for the softest mode, ∝ 1/√eigenvalue for the others."""
    ev = np.asarray(eigenvalues, dtype=np.float64)
    return scale * np.sqrt(ev.min() / ev)


@dataclass
class Target:
    """What the alignment needs about a batch of images at one resolution."""

    images_f: torch.Tensor  # (B, d, d//2+1) rfft of the images
    ctf: torch.Tensor  # (B, d, d//2+1)
    box: int
    pixel_size: float

    def model_filter(self, sigma_angstrom: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(projection sigma, model filter, rfft weights) for this resolution.

        Atoms are projected with a Gaussian no narrower than 0.75 px (sampled without aliasing),
        then re-sharpened in Fourier space to `sigma_angstrom`, the width the images were made
        with; correlation weights stop at 0.85 × Nyquist, where that sharpening stays moderate.
        """
        sigma_p = max(sigma_angstrom, 0.75 * self.pixel_size)
        dev = self.ctf.device
        filt = imaging.widen_gaussians(self.box, self.pixel_size, sigma_p, sigma_angstrom, dev)
        s2 = imaging.frequency_squared(self.box, self.pixel_size, dev)
        w = rfft_weights(self.box, self.ctf.device) * (s2 <= (0.85 / (2 * self.pixel_size)) ** 2)
        return sigma_p, filt, w


def rfft_weights(box: int, device=None) -> torch.Tensor:
    """Weights that make sums over an rfft grid equal sums over the full grid; DC excluded."""
    w = torch.full((box, box // 2 + 1), 2.0, device=device)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    w[0, 0] = 0.0  # mean-subtracted correlation
    return w


def make_target(
    images: torch.Tensor,
    ctf_params: dict,
    rows: np.ndarray,
    box: int,
    pixel_size_full: float,
    has_ctf: bool,
) -> Target:
    """Fourier-crop images (B, D, D) to `box` and compute their CTFs there."""
    full = images.shape[-1]
    px = pixel_size_full * full / box
    small = imaging.fourier_crop(images, box)
    dev, dt = images.device, images.dtype
    if has_ctf:
        c = imaging.particle_ctf(ctf_params, rows, px, box, dev)
    else:
        c = torch.ones(len(rows), box, box // 2 + 1, device=dev, dtype=dt)
    return Target(torch.fft.rfft2(small), c.to(dt), box, px)


class Gallery:
    """rfft of projections of the model on an SO(3) grid, at the coarse box.

    The models are the undeformed one and, when `gallery_amplitude` > 0, the model deformed by
    ± that amplitude along each mode, so strongly deformed particles still find their view.
    Each projection direction is projected once; its in-plane rotations are interpolated images
    (bilinear, about the centre D // 2), which is ample at the coarse resolution of the search.
    """

    def __init__(self, model: FlexibleModel, box: int, pixel_size: float, settings: AlignSettings):
        """`model` with torch arrays (`FlexibleModel.to`)."""
        grid_euler = geometry.fibonacci_sphere_euler(settings.n_directions, settings.psi_step)
        psis = np.unique(grid_euler[:, 2])
        dirs = grid_euler[:: len(psis)].copy()
        dirs[:, 2] = 0.0
        k = model.n_modes
        amps = np.zeros((1, k))
        if settings.gallery_amplitude > 0:
            amps = np.concatenate(
                [
                    amps,
                    settings.gallery_amplitude * np.eye(k),
                    -settings.gallery_amplitude * np.eye(k),
                ]
            )
        dev, dt = model.coords.device, model.coords.dtype
        rot = geometry.euler_to_matrix(torch.tensor(dirs, dtype=dt, device=dev))
        zero = torch.zeros(len(rot), 2, dtype=dt, device=dev)
        sigma = max(settings.sigma_angstrom, pixel_size)
        c = torch.arange(box, dtype=dt, device=dev) - box // 2
        qy, qx = torch.meshgrid(c, c, indexing="ij")
        flat, power = [], []
        for amp in amps:
            x = model.deform(torch.tensor(amp, dtype=dt, device=dev))
            proj = imaging.project(
                x, rot, zero, model.weights, box, pixel_size, sigma
            )  # (n_dir, d, d)
            chunks = []
            for psi in psis:  # output(q) = input(Rz(psi)ᵀ q), RELION's in-plane rotation
                cs, sn = math.cos(math.radians(psi)), math.sin(math.radians(psi))
                src = torch.stack([cs * qx - sn * qy, sn * qx + cs * qy], -1) + box // 2
                grid = (src * (2.0 / (box - 1)) - 1.0).expand(len(proj), box, box, 2)
                chunks.append(
                    torch.nn.functional.grid_sample(proj[:, None], grid, align_corners=True)[:, 0]
                )
            # order as grid_euler: direction-major, psi-minor
            proj_f = torch.fft.rfft2(torch.stack(chunks, 1).reshape(-1, box, box))
            flat.append(torch.cat([proj_f.real, proj_f.imag], -1).flatten(1).T)  # (2K, M)
            power.append((proj_f.abs() ** 2).flatten(1).T)
        self.flat = torch.cat(flat, 1).contiguous()  # (2K, n_models * M)
        self.power = torch.cat(power, 1).contiguous()
        self.euler = np.tile(grid_euler, (len(amps), 1))
        self.amplitudes = np.repeat(amps, len(grid_euler), 0)
        self.quat = torch.tensor(geometry.euler_to_quaternion(self.euler), dtype=dt, device=dev)


def global_search(
    target: Target, gallery: Gallery, settings: AlignSettings, full_box: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best well-separated candidates per image: Euler angles (B, C, 3) in degrees, shifts
    (B, C, 2) in full-box pixels and the amplitudes (B, C, K) of the gallery model that matched.

    For the integer coarse-pixel shifts s within the search radius, the CTF-weighted correlation
    Re Σ_k w_k I_k e^{2πi k·s/d} C_k conj(G_mk) of every image with every gallery entry is one
    real matrix product; it is normalised by each CTF-affected reference's norm. On a CPU the
    images are searched SEARCH_CHUNK_CPU at a time (the product is images × shifts × entries).
    """
    d, dev = target.box, target.images_f.device
    scale = full_box / d
    w = rfft_weights(d, dev)
    r = max(1, int(math.floor(settings.max_shift_px / scale)))
    grid = torch.arange(-r, r + 1, device=dev, dtype=torch.float32)
    sy, sx = torch.meshgrid(grid, grid, indexing="ij")
    keep = sx**2 + sy**2 <= max(r, settings.max_shift_px / scale) ** 2
    lags = torch.stack([sx[keep], sy[keep]], -1)  # (S, 2) as (x, y)
    ky = torch.fft.fftfreq(d, 1 / d, device=dev)[:, None]
    kx = torch.fft.rfftfreq(d, 1 / d, device=dev)[None, :]
    # the image shifted back by s correlates with the reference: phase e^{+2πi k·s/d}
    phase = torch.exp(
        2j * math.pi * (lags[:, 0, None, None] * kx + lags[:, 1, None, None] * ky) / d
    )
    n = len(target.images_f)
    step = n if dev.type == "cuda" else SEARCH_CHUNK_CPU
    best, idx = [], []
    for i in range(0, n, step):
        ctf, img = target.ctf[i : i + step], target.images_f[i : i + step]
        x = (w * ctf * img)[:, None] * phase  # (b, S, d, d/2+1)
        x = torch.cat([x.real, x.imag], -1).flatten(2)  # (b, S, 2K)
        cc = x @ gallery.flat  # (b, S, M)
        norm = torch.sqrt((w * ctf**2).flatten(1) @ gallery.power)
        b, j = (cc / norm[:, None, :]).max(1)  # over shifts: (b, M)
        best.append(b)
        idx.append(j)
    best, idx = torch.cat(best), torch.cat(idx)
    top = best.topk(min(64 * settings.candidates, best.shape[1]), dim=1).indices  # best first
    chosen = top.gather(
        1, geometry.separated(gallery.quat[top], settings.candidates, settings.min_separation_deg)
    )  # (B, C) gallery entries
    shifts = (lags[idx.gather(1, chosen)] * scale).cpu().numpy()
    chosen = chosen.cpu().numpy()
    return gallery.euler[chosen], shifts, gallery.amplitudes[chosen]


def skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    z = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([z, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], z, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], z], -1),
        ],
        -2,
    )


def ncc(model_f: torch.Tensor, target: Target, weights: torch.Tensor) -> torch.Tensor:
    """Normalised correlation between CTF·model and the image, on the rfft grid (B,)."""
    a = model_f * target.ctf
    num = (weights * (a * target.images_f.conj()).real).sum((-2, -1))
    den = torch.sqrt(
        (weights * a.abs() ** 2).sum((-2, -1))
        * (weights * target.images_f.abs() ** 2).sum((-2, -1))
    )
    return num / den.clamp_min(1e-30)


def model_ncc(
    target: Target,
    model: FlexibleModel,
    rot: torch.Tensor,
    shift: torch.Tensor,
    amp: torch.Tensor,
    settings: AlignSettings,
    full_box: int,
) -> torch.Tensor:
    """NCC (B,) of each image with its model deformed by `amp` (B, K), seen with `rot` (B, 3, 3)
    and displaced by `shift` (B, 2, full-box pixels)."""
    sigma, filt, w = target.model_filter(settings.sigma_angstrom)
    x = model.deform(amp)
    shift = shift / (full_box / target.box)
    proj = imaging.project(x, rot, shift, model.weights, target.box, target.pixel_size, sigma)
    return ncc(torch.fft.rfft2(proj) * filt, target, w)


def model_objective(
    target: Target,
    model: FlexibleModel,
    rot: torch.Tensor,
    shift: torch.Tensor,
    amp: torch.Tensor,
    settings: AlignSettings,
    full_box: int,
    prior_sd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NCC, objective) (B,) of `model_ncc`'s arguments: the objective is -NCC, or with a prior
    (per-mode std `prior_sd`, (K,)) the negative log posterior (M/2)·log(1 - NCC₊²) +
    ½ Σ (q_k / sd_k)², M the number of Fourier terms compared."""
    c = model_ncc(target, model, rot, shift, amp, settings, full_box)
    if prior_sd is None:
        return c, -c
    n_terms = float(target.model_filter(settings.sigma_angstrom)[2].sum())
    data = 0.5 * n_terms * torch.log1p(-(c.clamp(0.0, 1.0 - 1e-6) ** 2))
    return c, data + 0.5 * ((amp / prior_sd) ** 2).sum(1)


def refine(
    target: Target,
    model: FlexibleModel,
    rot0: torch.Tensor,
    shift0: torch.Tensor,
    amp0: torch.Tensor,
    iterations: int,
    settings: AlignSettings,
    full_box: int,
    prior_sd: torch.Tensor | None = None,
    omega0: torch.Tensor | None = None,
    bound: Bound | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam over (amplitudes, rotation, shift) of `model` (torch arrays). Returns rot, shift, amplitudes, ncc, objective
    and ω, the rotation vector (radians) of rot relative to `rot0`: rot = exp([ω]ₓ) rot0.

    The objective is `model_objective`'s. ω starts at `omega0` (zero by default); with a
    `bound`, |ω| and the shift's distance to the bound's centre are projected back into their
    limits after every step.
    """
    if omega0 is None:
        omega0 = torch.zeros(len(rot0), 3, dtype=model.coords.dtype, device=model.coords.device)
    omega = omega0.clone().requires_grad_(True)
    shift = shift0.clone().requires_grad_(True)
    amp = amp0.clone().requires_grad_(True)
    opt = torch.optim.Adam(
        [
            {"params": [amp], "lr": settings.lr_amplitude},
            {"params": [omega], "lr": settings.lr_rotation},
            {"params": [shift], "lr": settings.lr_shift},
        ]
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=0.0)

    def score() -> tuple[torch.Tensor, torch.Tensor]:
        rot = torch.linalg.matrix_exp(skew(omega)) @ rot0
        return model_objective(target, model, rot, shift, amp, settings, full_box, prior_sd)

    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        score()[1].sum().backward()
        opt.step()
        sched.step()
        if bound is not None:
            with torch.no_grad():
                limit = math.radians(bound.max_angle_deg)
                omega.mul_((limit / omega.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1))
                d = shift - bound.shift_center
                d.mul_(
                    (bound.max_shift_px / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1)
                )
                shift.copy_(bound.shift_center + d)
    with torch.no_grad():
        final, objective = score()
        rot = torch.linalg.matrix_exp(skew(omega)) @ rot0
    return rot, shift.detach(), amp.detach(), final, objective, omega.detach()


class Aligner:
    """HEMNMA alignment of batches of images against one flexible model."""

    def __init__(
        self,
        model: FlexibleModel,
        box: int,
        pixel_size: float,
        settings: AlignSettings,
        device: torch.device,
    ):
        self.s, self.box, self.px, self.dev = settings, box, pixel_size, device
        self.batch = settings.batch or (128 if device.type == "cuda" else 32)
        self.model = model.to(device)
        self.prior_sd = None
        if settings.amplitude_prior > 0:
            if model.eigenvalues is None:
                raise ValueError("an amplitude prior needs the modes' eigenvalues")
            prior = prior_std(model.eigenvalues, settings.amplitude_prior)
            self.prior_sd = torch.as_tensor(prior, dtype=torch.float32, device=device)
        self.coarse = min(settings.coarse_box, box)
        coarse_px = pixel_size * box / self.coarse

        def pseudo_atoms(cell: float) -> tuple[FlexibleModel, float]:
            """The model as pseudo-atoms per cube of `cell` Å, their spread (Å); 0: the atoms."""
            if cell <= 0:
                return self.model, 0.0
            pseudo, spread = model.coarsened(cell)
            return pseudo.to(device), spread

        search_cube = settings.coarse_cell * coarse_px
        cell = settings.coarse_cell
        if settings.start != "search" and self.coarse < box:
            # local mode: coarser, unless its coarse stage is at the full box (32-px images of
            # 4.4 Å, noise-free, from 8° off: 0.68° from the truth on cubes of 1.4 pixel, 0.32°
            # on cubes of 0.7)
            cell = settings.local_coarse_cell
        self.coarse_model, self.coarse_spread = pseudo_atoms(cell * coarse_px)
        # never coarser than the search's coarse stage (32-px images of 4.4 Å, noise-free, refined
        # locally on cubes of one pixel: 0.69° from the truth, on cubes of 0.7 pixel 0.41°)
        self.full_model, self.full_spread = pseudo_atoms(
            min(settings.full_cell * pixel_size, search_cube)
        )
        self.gallery = None  # local modes need none
        if settings.start == "search":
            self.gallery = Gallery(self.model, self.coarse, coarse_px, settings)

    def at_coarse(self, s: AlignSettings) -> AlignSettings:
        """Settings `s` for the coarse model (its pseudo-atoms' width)."""
        return replace(s, sigma_angstrom=math.hypot(s.sigma_angstrom, self.coarse_spread))

    def at_full(self, s: AlignSettings) -> AlignSettings:
        """Settings `s` for the full-box model (its pseudo-atoms' width)."""
        return replace(s, sigma_angstrom=math.hypot(s.sigma_angstrom, self.full_spread))

    def start_amplitudes(
        self, target: Target, rot: torch.Tensor, shift: torch.Tensor, amp: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Per local candidate (R,), the min(n, 2K + 1) amplitude vectors (R, ·, K) that correlate
        best at its start pose among its own and those ± `gallery_amplitude` along each mode (as
        in the gallery), best first; its own alone when `gallery_amplitude` is 0."""
        g, k = self.s.gallery_amplitude, amp.shape[1]
        if g <= 0:
            return amp[:, None]
        eye = torch.eye(k, dtype=amp.dtype, device=amp.device)
        steps = torch.cat([torch.zeros_like(eye[:1]), g * eye, -g * eye])  # (M, K)
        m = len(steps)
        trial = (amp[:, None] + steps).reshape(-1, k)
        rep = lambda x: x.repeat_interleave(m, 0)
        with torch.no_grad():
            c = model_ncc(
                Target(rep(target.images_f), rep(target.ctf), target.box, target.pixel_size),
                self.coarse_model,
                rep(rot),
                rep(shift),
                trial,
                self.at_coarse(self.s),
                self.box,
            )
        best = c.view(-1, m).topk(min(n, m), 1).indices  # (R, n)
        return trial.view(-1, m, k).gather(1, best[..., None].expand(-1, -1, k))

    def refine_starts(
        self,
        target: Target,
        rot0: torch.Tensor,
        shift0: torch.Tensor,
        amp0: torch.Tensor,
        iterations: int,
        s: AlignSettings,
        prune: bool,
    ) -> tuple[torch.Tensor, ...]:
        """Local mode, coarse box: `refine`'s answer for each candidate (R,) refined from its
        amplitude starts, the best objective kept. With `prune`, its `local_starts` best, of which
        only the best goes on after `local_prune_after` iterations (with a fresh step schedule
        over the remaining ones: a warm restart); without, its `local_retry_starts` best, carried
        through."""
        n = s.local_starts if prune else s.local_retry_starts(amp0.shape[1])
        starts = self.start_amplitudes(target, rot0, shift0, amp0, n)  # (R, n, K)
        r, n = starts.shape[:2]
        rep = lambda x: x.repeat_interleave(n, 0)
        many = Target(rep(target.images_f), rep(target.ctf), target.box, target.pixel_size)
        first = s.local_prune_after if prune and s.local_pruned else iterations
        bound = Bound(s.local_max_angle_deg, s.local_max_shift_px, rep(shift0))
        out = refine(
            many, self.coarse_model, rep(rot0), rep(shift0), starts.reshape(r * n, -1), first,
            self.at_coarse(s), self.box, self.prior_sd, bound=bound,
        )  # fmt: skip
        best = out[4].view(r, n).argmin(1) + torch.arange(r, device=rot0.device) * n
        rot, shift, amp, score, objective, omega = (x[best] for x in out)
        if first == iterations:
            return rot, shift, amp, score, objective, omega
        bound = Bound(s.local_max_angle_deg, s.local_max_shift_px, shift0)
        return refine(
            target, self.coarse_model, rot0, shift, amp, iterations - first, self.at_coarse(s),
            self.box, self.prior_sd, omega, bound,
        )  # fmt: skip

    def align(
        self,
        images: np.ndarray,
        ctf_params: dict,
        rows: np.ndarray,
        has_ctf: bool,
        start: Start | None = None,
        thorough: bool = False,
    ) -> dict:
        """Estimate (euler (B,3), shifts_px (B,2), amplitudes (B,K), cost (B,), objective (B,))
        for one batch; the objective is what the refinement minimised (-NCC without a prior).
        Candidates come from the global search (`retry_candidates` of them when `thorough`), or
        with `start` from local_candidates; local candidates are refined from several amplitude
        starts (`refine_starts`: pruned, or when `thorough` more of them, unpruned)."""
        imgs = torch.as_tensor(images, dtype=torch.float32, device=self.dev)
        coarse = make_target(imgs, ctf_params, rows, self.coarse, self.px, has_ctf)
        eul, sh, amp_init, iterations, s = self.candidates(coarse, start, thorough)
        # stage 1: all candidates at the coarse box
        c = eul.shape[1]
        rep = lambda x: x.repeat_interleave(c, 0)
        coarse_c = Target(rep(coarse.images_f), rep(coarse.ctf), coarse.box, coarse.pixel_size)
        f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=self.dev)
        rot0 = geometry.euler_to_matrix(f32(eul.reshape(-1, 3)))
        shift0, amp0 = f32(sh.reshape(-1, 2)), f32(amp_init.reshape(-1, self.model.n_modes))
        if start is None:
            bound = None
            rot, shift, amp, _, objective, omega = refine(
                coarse_c, self.coarse_model, rot0, shift0, amp0, iterations[0],
                self.at_coarse(s), self.box, self.prior_sd,
            )  # fmt: skip
        else:
            bound = Bound(s.local_max_angle_deg, s.local_max_shift_px, shift0)
            rot, shift, amp, _, objective, omega = self.refine_starts(
                coarse_c, rot0, shift0, amp0, iterations[0], s, prune=not thorough
            )
        if c > 1 and self.coarse_model is not self.model:  # rank with the atoms themselves
            with torch.no_grad():
                objective = model_objective(
                    coarse_c, self.model, rot, shift, amp, s, self.box, self.prior_sd
                )[1]
        best = objective.view(len(imgs), c).argmin(1) + torch.arange(len(imgs), device=self.dev) * c
        # stage 2: the best candidate at the full box (local: still bound to its start)
        full = make_target(imgs, ctf_params, rows, self.box, self.px, has_ctf)
        if bound is None:
            anchor, omega0 = rot[best], None
        else:
            anchor, omega0 = rot0[best], omega[best]
            bound = Bound(bound.max_angle_deg, bound.max_shift_px, shift0[best])
        out = refine(
            full, self.full_model, anchor, shift[best], amp[best], iterations[1],
            self.at_full(s), self.box, self.prior_sd, omega0, bound,
        )  # fmt: skip
        return alignment_result(*out[:5])

    def candidates(
        self, coarse: Target, start: Start | None, thorough: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int], AlignSettings]:
        """(Euler angles, shifts, amplitudes) of the candidates (B, C, ·), the iterations of the
        two stages and the refinement settings: from the global search (`retry_candidates` of
        them when `thorough`), or around `start` with the local iterations and amplitude step."""
        s = self.s
        if start is None:
            if self.gallery is None:
                raise ValueError(f"start {s.start!r} needs starting values")
            search = replace(s, candidates=s.retry_candidates) if thorough else s
            eul, sh, amp = global_search(coarse, self.gallery, search, self.box)
            return eul, sh, amp, s.iterations, s
        eul, sh, amp = local_candidates(start, s.local_flip)
        return eul, sh, amp, s.local_iterations, replace(s, lr_amplitude=s.local_lr_amplitude)


def alignment_result(
    rot: torch.Tensor,
    shift: torch.Tensor,
    amp: torch.Tensor,
    score: torch.Tensor,
    objective: torch.Tensor,
) -> dict[str, np.ndarray]:
    """The refinement's answer as float64 numpy arrays: euler, shifts_px, amplitudes, cost
    (1 - NCC) and objective."""
    return {
        "euler": geometry.matrix_to_euler(rot.double()).cpu().numpy(),
        "shifts_px": shift.cpu().numpy().astype(np.float64),
        "amplitudes": amp.cpu().numpy().astype(np.float64),
        "cost": (1.0 - score).cpu().numpy().astype(np.float64),
        "objective": objective.cpu().numpy().astype(np.float64),
    }


def align_best(
    aligners: Sequence[Aligner],
    images: np.ndarray,
    ctf_params: dict,
    rows: np.ndarray,
    has_ctf: bool,
    start: Start | None = None,
    thorough: bool = False,
) -> dict[str, np.ndarray]:
    """Align one batch against every reference (`Aligner.align`, passing `thorough`); each
    image keeps the lowest objective.

    Adds 'reference' (B,), the 0-based index of the chosen aligner. A `start`'s amplitudes are on
    the first reference's modes: the other references start undeformed, from the same
    orientations (the start's and its candidates).
    """
    starts = [start] * len(aligners)
    if start is not None:
        zero = np.zeros_like(start.amplitudes)
        undeformed = Start(start.euler, start.shifts_px, zero, start.candidates)
        starts = [start] + [undeformed] * (len(aligners) - 1)
    runs = [
        a.align(images, ctf_params, rows, has_ctf, st, thorough=thorough)
        for a, st in zip(aligners, starts, strict=True)
    ]
    choice = np.argmin(np.stack([r["objective"] for r in runs]), 0)
    out = {key: np.stack([r[key] for r in runs])[choice, np.arange(len(choice))] for key in runs[0]}
    out["reference"] = choice
    return out


Gather = Callable[[np.ndarray], np.ndarray]  # one rank's array -> all ranks' (an MPI allgather)


def align_rows(
    ps: ParticleSet,
    rows: np.ndarray,
    aligner: Aligner | Sequence[Aligner],
    desc: str = "hemnma",
    start: Start | None = None,
    gather: Gather | None = None,
) -> dict[str, np.ndarray]:
    """Align the particle rows `rows` in batches against one or several references, by the
    global search, or in local mode when `start` (one row per particle of `ps`) is given. In
    both modes the images left with the highest cost are then aligned again, more thoroughly,
    each keeping the better answer: global search, the `retry` share with `retry_candidates`
    candidates (when more than `candidates`); local mode, the `local_retry` share from
    `local_retry_starts` amplitude starts, unpruned (when that differs from the first pass).
    Under MPI, `gather` (see `redo_worst`) makes the shares of all ranks' images together."""
    aligners = [aligner] if isinstance(aligner, Aligner) else list(aligner)
    result = align_batches(ps, rows, aligners, desc, start)
    s = aligners[0].s
    if start is None:
        share, more = s.retry, s.retry_candidates > s.candidates
        what = f"searched again with {s.retry_candidates} candidates"
    else:
        share, more = s.local_retry, s.local_retry_helps(aligners[0].model.n_modes)
        what = "refined again from more amplitude starts, unpruned"
    if not more:
        return result
    redo = lambda worst: align_batches(
        ps, rows[worst], aligners, f"{desc} (retried)", start, thorough=True
    )
    return redo_worst(result, share, redo, what, gather)


def redo_worst(
    result: dict[str, np.ndarray],
    share: float,
    redo: Callable[[np.ndarray], dict[str, np.ndarray]],
    what: str,
    gather: Gather | None = None,
) -> dict[str, np.ndarray]:
    """`result` with its entries among the ⌈share · n⌉ of highest cost done again by `redo`
    (their indices -> answers), each keeping the lower objective; logs how many improved, `what`
    naming how they were redone. The n costs are `result`'s, or with `gather` every MPI rank's
    (a collective call), so that the answers do not depend on how the images were split."""
    cost = result["cost"]
    every = cost if gather is None else gather(cost)
    n = min(len(every), math.ceil(share * len(every)))
    if not n:
        return result
    worst = np.flatnonzero(cost >= np.sort(every)[-n])
    again = redo(worst)
    better = again["objective"] < result["objective"][worst]
    out = {k: v.copy() for k, v in result.items()}
    for k in out:
        out[k][worst[better]] = again[k][better]
    log.info("%s the %d images with the highest cost: %d improved", what, len(worst), better.sum())
    return out


def align_batches(
    ps: ParticleSet,
    rows: np.ndarray,
    aligners: list[Aligner],
    desc: str,
    start: Start | None,
    thorough: bool = False,
) -> dict[str, np.ndarray]:
    """`align_best` over `rows` in batches of the first aligner's size, with progress."""
    ctf_params = ps.ctf_params()
    parts: list[dict] = []
    bs = aligners[0].batch
    for first in tqdm(range(0, len(rows), bs), desc=desc, unit="batch", mininterval=10):
        r = rows[first : first + bs]
        st = None if start is None else start.take(r)
        parts.append(align_best(aligners, ps.images[r], ctf_params, r, ps.has_ctf, st, thorough))
    if not parts:
        k = aligners[0].model.n_modes
        return {
            "euler": np.zeros((0, 3)),
            "shifts_px": np.zeros((0, 2)),
            "amplitudes": np.zeros((0, k)),
            "cost": np.zeros(0),
            "objective": np.zeros(0),
            "reference": np.zeros(0, dtype=int),
        }
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def escalate(
    ps: ParticleSet,
    rows: np.ndarray,
    references: list[FlexibleModel],
    settings: AlignSettings,
    device: torch.device,
    result: dict[str, np.ndarray],
    fraction: float,
    gather: Gather | None = None,
) -> dict[str, np.ndarray]:
    """`result` of local refinement of `rows`, with the `fraction` of images left with the
    highest cost (a start outside the right basin leaves the image unexplained) aligned again
    from the global search (with its own `retry`); each of them keeps the answer with the lower
    objective. `gather`: as `redo_worst`'s."""
    search = replace(settings, start="search")
    redo = lambda worst: align_rows(
        ps,
        rows[worst],
        [Aligner(r, ps.box, ps.pixel_size, search, device) for r in references],
        "hemnma (escalated)",
        gather=gather,
    )
    return redo_worst(result, fraction, redo, "escalated to the global search", gather)


def result_table(
    ps: ParticleSet,
    result: dict,
    mode_numbers: np.ndarray,
    references: list[FlexibleModel] | None = None,
) -> pd.DataFrame:
    """The input particle rows with the estimated pose, amplitudes and cost.

    With several references, also `dhReference` (1-based) and the amplitudes on the chosen
    reference's own modes (`dhRefAmplitudeMode<k>`); `dhAmplitudeMode<k>` are then on the first
    reference's modes.
    """
    out = ps.particles.copy()
    for col, values in pose_columns(result["euler"], result["shifts_px"], ps.pixel_size).items():
        out[col] = values
    amps = result["amplitudes"]
    if references is not None and len(references) > 1:
        amps = common_amplitudes(references, result["reference"], result["amplitudes"])
    for j, k in enumerate(mode_numbers):
        out[amplitude_column(int(k))] = amps[:, j]
    out["dhCost"] = result["cost"]
    if references is not None and len(references) > 1:
        out["dhReference"] = result["reference"] + 1
        for j, k in enumerate(mode_numbers):
            out[f"dhRefAmplitudeMode{int(k)}"] = result["amplitudes"][:, j]
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="particle STAR (a shard)")
    p.add_argument("--model", nargs="+", required=True, help="model.npz, one per reference")
    p.add_argument("--modes", nargs="+", required=True, help="modes.npz, one per reference")
    p.add_argument("--out", required=True, help="output STAR")
    d = AlignSettings()
    p.add_argument(
        "--coarse-box",
        type=int,
        default=d.coarse_box,
        help="box of the global search and the first refinement",
    )
    p.add_argument(
        "--coarse-cell",
        type=float,
        default=d.coarse_cell,
        help="coarse refinement on pseudo-atoms, the atoms merged per cube of this edge in "
        "coarse-box pixels; 0: on the atoms",
    )
    p.add_argument(
        "--full-cell",
        type=float,
        default=d.full_cell,
        help="full-box refinement on pseudo-atoms, the atoms merged per cube of this edge in "
        "full-box pixels, at most --coarse-cell's cube; 0: on the atoms",
    )
    p.add_argument(
        "--n-directions",
        type=int,
        default=d.n_directions,
        help="projection directions of the search grid",
    )
    p.add_argument(
        "--psi-step",
        type=float,
        default=d.psi_step,
        help="in-plane step of the search grid (degrees)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=d.candidates,
        help="orientations kept from the search for refinement",
    )
    p.add_argument(
        "--retry",
        type=float,
        default=d.retry,
        help="global search: share of the shard's images (all its MPI ranks together), those "
        "left with the highest cost, searched again with --retry-candidates candidates; each "
        "keeps the better answer",
    )
    p.add_argument(
        "--retry-candidates",
        type=int,
        default=d.retry_candidates,
        help="global search: candidates of the retried images (no retry unless > --candidates)",
    )
    p.add_argument(
        "--gallery-amplitude",
        type=float,
        default=d.gallery_amplitude,
        help="gallery models deformed by ± this along each mode (0: undeformed only)",
    )
    p.add_argument(
        "--max-shift-px", type=float, default=d.max_shift_px, help="largest shift searched (pixels)"
    )
    p.add_argument(
        "--iterations",
        type=int,
        nargs=2,
        default=list(d.iterations),
        help="refinement iterations at the coarse box, then at the full box",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images aligned at once (default: 32 on a CPU, 128 on a GPU)",
    )
    p.add_argument(
        "--sigma-angstrom", type=float, default=d.sigma_angstrom, help="atom Gaussian width (Å)"
    )
    p.add_argument(
        "--amplitude-prior",
        type=float,
        default=d.amplitude_prior,
        help="Gaussian amplitude prior: std of the softest mode, others ∝ 1/√eigenvalue (0: none)",
    )
    p.add_argument(
        "--start",
        choices=START_MODES,
        default=d.start,
        help="search: global search; priors: local refinement from the consensus pose "
        "(_rlnAngleRotPrior...); network: local refinement from the STAR's pose and amplitudes",
    )
    p.add_argument(
        "--local-max-angle-deg",
        type=float,
        default=d.local_max_angle_deg,
        help="local mode: largest rotation from the start (degrees)",
    )
    p.add_argument(
        "--local-max-shift-px",
        type=float,
        default=d.local_max_shift_px,
        help="local mode: largest shift from the start (pixels)",
    )
    p.add_argument(
        "--local-iterations",
        type=int,
        nargs=2,
        default=list(d.local_iterations),
        help="local mode: iterations at the coarse box, then at the full box",
    )
    p.add_argument(
        "--local-flip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="local mode: also try the 180° in-plane flip",
    )
    p.add_argument(
        "--local-starts",
        type=int,
        default=d.local_starts,
        help="local mode: amplitude starts per orientation, the best-correlating of the start's "
        "own and ± --gallery-amplitude along each mode (at most 2K + 1; 1 when that is 0)",
    )
    p.add_argument(
        "--local-prune-after",
        type=int,
        default=d.local_prune_after,
        help="local mode: coarse iterations after which only each orientation's best start goes on",
    )
    p.add_argument(
        "--local-retry",
        type=float,
        default=d.local_retry,
        help="local mode: share of the shard's images (all its MPI ranks together), those left "
        "with the highest cost, refined again from the best-correlating 3 x --local-starts of the "
        "2K + 1 amplitude starts, unpruned; each keeps the better answer",
    )
    p.add_argument(
        "--local-coarse-cell",
        type=float,
        default=d.local_coarse_cell,
        help="local mode: its coarse refinement on pseudo-atoms per cube of this edge (coarse "
        "px; where the coarse box is the full box, --coarse-cell's); 0: atoms",
    )
    p.add_argument(
        "--escalate",
        type=float,
        default=0.0,
        help="local mode: this fraction of the images, those left with the highest cost, are "
        "aligned again by the global search; each keeps the better answer (default: none)",
    )


def settings_from_args(args: argparse.Namespace) -> AlignSettings:
    return AlignSettings(
        coarse_box=args.coarse_box,
        coarse_cell=args.coarse_cell,
        full_cell=args.full_cell,
        n_directions=args.n_directions,
        psi_step=args.psi_step,
        candidates=args.candidates,
        retry=args.retry,
        retry_candidates=args.retry_candidates,
        gallery_amplitude=args.gallery_amplitude,
        max_shift_px=args.max_shift_px,
        iterations=tuple(args.iterations),
        batch=args.batch,
        sigma_angstrom=args.sigma_angstrom,
        amplitude_prior=args.amplitude_prior,
        start=args.start,
        local_max_angle_deg=args.local_max_angle_deg,
        local_max_shift_px=args.local_max_shift_px,
        local_iterations=tuple(args.local_iterations),
        local_flip=args.local_flip,
        local_starts=args.local_starts,
        local_prune_after=args.local_prune_after,
        local_retry=args.local_retry,
        local_coarse_cell=args.local_coarse_cell,
    )


def main(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # Snakemake sets OMP_NUM_THREADS to the job's threads (= ranks): share them among ranks
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, threads // size))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ps = ParticleSet(args.particles)
    references = load_references(args.model, args.modes)
    settings = settings_from_args(args)
    if not 0.0 <= args.escalate <= 1.0 or (args.escalate > 0 and settings.start == "search"):
        raise InputError(f"--escalate {args.escalate:g}: a fraction in [0, 1], local mode only")
    for flag, cell in [
        ("--coarse-cell", settings.coarse_cell),
        ("--full-cell", settings.full_cell),
        ("--local-coarse-cell", settings.local_coarse_cell),
    ]:
        if not cell >= 0:
            raise InputError(f"{flag} {cell:g}: at least 0 (0: the atoms)")
    for flag, share in [("--retry", settings.retry), ("--local-retry", settings.local_retry)]:
        if not 0.0 <= share <= 1.0:
            raise InputError(f"{flag} {share:g}: a fraction in [0, 1]")
    if min(settings.local_starts, settings.local_prune_after) < 1:
        raise InputError(
            f"--local-starts {settings.local_starts}, --local-prune-after "
            f"{settings.local_prune_after}: each at least 1"
        )
    numbers = references[0].mode_numbers
    start = None if settings.start == "search" else read_start(ps, settings.start, numbers)
    aligners = [Aligner(r, ps.box, ps.pixel_size, settings, device) for r in references]
    rows = np.arange(len(ps))[rank::size]
    gather = (lambda x: np.concatenate(comm.allgather(x))) if size > 1 else None
    result = align_rows(ps, rows, aligners, f"hemnma rank {rank}/{size}", start, gather)
    if args.escalate > 0:
        result = escalate(ps, rows, references, settings, device, result, args.escalate, gather)
    gathered = comm.gather((rows, result), root=0)
    if rank == 0:
        order = np.concatenate([g[0] for g in gathered])
        merged = {k: np.concatenate([g[1][k] for g in gathered])[np.argsort(order)] for k in result}
        write_star(args.out, ps.optics, result_table(ps, merged, numbers, references))
        if len(references) > 1:
            counts = np.bincount(merged["reference"], minlength=len(references))
            log.info("images per reference: %s", ", ".join(map(str, counts)))
        log.info(
            "aligned %d images (start: %s) on %d rank(s): mean cost %.4f",
            len(ps),
            settings.start,
            size,
            merged["cost"].mean() if len(ps) else math.nan,
        )
