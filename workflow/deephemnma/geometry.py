"""Rotations: RELION ZYZ Euler angles, rotation matrices, unit quaternions (the paper's convention).

Euler angles are (rot, tilt, psi) = (phi, theta, psi) in degrees. The matrix A is RELION's
``Euler_angles2matrix``: it maps a model point r to the projection frame, A r, whose first two
components are image coordinates. Quaternions are (w, x, y, z) with q = q_psi * q_theta * q_phi as in
the DeepHEMNMA supplementary SA; their (active) rotation R(q) equals P A P with P = diag(-1, 1, 1),
so the angle between two quaternions equals the angle between the two RELION matrices.

All functions take numpy arrays or torch tensors with any leading batch shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def _lib(x: Array):
    return torch if isinstance(x, torch.Tensor) else np


def _stack(xs: list, axis: int, like: Array):
    return torch.stack(xs, dim=axis) if isinstance(like, torch.Tensor) else np.stack(xs, axis=axis)


def euler_to_matrix(euler_deg: Array) -> Array:
    """RELION rotation matrices (..., 3, 3) from ZYZ Euler angles (..., 3) in degrees."""
    xp = _lib(euler_deg)
    a = euler_deg * (np.pi / 180.0)
    ca, cb, cg = xp.cos(a[..., 0]), xp.cos(a[..., 1]), xp.cos(a[..., 2])
    sa, sb, sg = xp.sin(a[..., 0]), xp.sin(a[..., 1]), xp.sin(a[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        _stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1, a),
        _stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1, a),
        _stack([sc, ss, cb], -1, a),
    ]
    return _stack(rows, -2, a)


def matrix_to_euler(mat: Array) -> Array:
    """ZYZ Euler angles (..., 3) in degrees, tilt in [0, 180], from RELION matrices (..., 3, 3)."""
    xp = _lib(mat)
    abs_sb = xp.sqrt(mat[..., 0, 2] ** 2 + mat[..., 1, 2] ** 2)
    regular = abs_sb > 1e-6
    rot = xp.where(regular, xp.arctan2(mat[..., 2, 1], mat[..., 2, 0]), 0.0 * abs_sb)
    tilt = xp.arctan2(abs_sb, mat[..., 2, 2])
    psi_reg = xp.arctan2(mat[..., 1, 2], -mat[..., 0, 2])
    # gimbal lock: tilt 0 or 180, only rot + psi (or psi - rot) is defined; put it all in psi
    psi_top = xp.arctan2(-mat[..., 1, 0], mat[..., 0, 0])
    psi_bottom = xp.arctan2(mat[..., 1, 0], -mat[..., 0, 0])
    psi_sing = xp.where(mat[..., 2, 2] > 0, psi_top, psi_bottom)
    psi = xp.where(regular, psi_reg, psi_sing)
    return _stack([rot, tilt, psi], -1, mat) * (180.0 / np.pi)


def canonical_quaternion(q: Array) -> Array:
    """Unit quaternions with w >= 0 (q and -q are the same rotation)."""
    xp = _lib(q)
    norm = xp.linalg.norm(q, axis=-1, keepdims=True) if xp is np else q.norm(dim=-1, keepdim=True)
    q = q / norm
    sign = (
        xp.where(q[..., :1] < 0, -1.0, 1.0) if xp is np else torch.where(q[..., :1] < 0, -1.0, 1.0)
    )
    return q * sign


def euler_to_quaternion(euler_deg: Array) -> Array:
    """The paper's quaternions (w, x, y, z) = q_psi * q_theta * q_phi (supplementary SA), canonical sign."""
    xp = _lib(euler_deg)
    a = euler_deg * (np.pi / 360.0)  # half angles
    phi, theta, psi = a[..., 0], a[..., 1], a[..., 2]
    q = _stack(
        [
            xp.cos(theta) * xp.cos(psi + phi),
            -xp.sin(theta) * xp.sin(psi - phi),
            xp.sin(theta) * xp.cos(psi - phi),
            xp.cos(theta) * xp.sin(psi + phi),
        ],
        -1,
        euler_deg,
    )
    return canonical_quaternion(q)


def quaternion_to_matrix(q: Array) -> Array:
    """RELION matrices A (..., 3, 3) from the paper's quaternions (need not be normalised)."""
    xp = _lib(q)
    q = q / (
        xp.linalg.norm(q, axis=-1, keepdims=True) if xp is np else q.norm(dim=-1, keepdim=True)
    )
    # A = P R(q) P with P = diag(-1, 1, 1), i.e. the active rotation of (w, x, -y, -z)
    w, x, y, z = q[..., 0], q[..., 1], -q[..., 2], -q[..., 3]
    rows = [
        _stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1, q),
        _stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1, q),
        _stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1, q),
    ]
    return _stack(rows, -2, q)


def quaternion_to_euler(q: Array) -> Array:
    """ZYZ Euler angles in degrees from the paper's quaternions."""
    return matrix_to_euler(quaternion_to_matrix(q))


def quaternion_distance_deg(q1: Array, q2: Array) -> Array:
    """Angle in degrees of the rotation between two orientations: 2 acos |<q1, q2>|."""
    xp = _lib(q1)
    if xp is np:
        n1, n2 = np.linalg.norm(q1, axis=-1), np.linalg.norm(q2, axis=-1)
        dot = np.abs(np.sum(q1 * q2, axis=-1)) / (n1 * n2)
        return 2 * np.degrees(np.arccos(np.clip(dot, 0.0, 1.0)))
    dot = (q1 * q2).sum(-1).abs() / (q1.norm(dim=-1) * q2.norm(dim=-1))
    return 2 * torch.rad2deg(torch.arccos(dot.clamp(0.0, 1.0)))


def euler_distance_deg(e1: Array, e2: Array) -> Array:
    """Angular distance in degrees between orientations given as ZYZ Euler angles."""
    return quaternion_distance_deg(euler_to_quaternion(e1), euler_to_quaternion(e2))


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """n quaternions uniform on SO(3) (normalised 4D Gaussians), canonical sign."""
    return canonical_quaternion(rng.standard_normal((n, 4)))


def random_euler(n: int, rng: np.random.Generator) -> np.ndarray:
    """n Euler-angle triplets (degrees) of orientations uniform on SO(3)."""
    return quaternion_to_euler(random_quaternions(n, rng))


def fibonacci_sphere_euler(n_directions: int, psi_step_deg: float) -> np.ndarray:
    """A near-uniform grid on SO(3): Fibonacci projection directions (rot, tilt) x in-plane psi."""
    i = np.arange(n_directions) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * i / n_directions))
    rot = np.degrees(np.pi * (1 + 5**0.5) * i) % 360.0
    psis = np.arange(0.0, 360.0, psi_step_deg)
    n_psi = len(psis)
    return np.stack(
        [np.repeat(rot, n_psi), np.repeat(tilt, n_psi), np.tile(psis, n_directions)], -1
    )


def super_fibonacci_matrices(n: int) -> np.ndarray:
    """n near-uniform rotations (n, 3, 3), RELION matrices, from the super-Fibonacci spiral of
    unit quaternions (Alexa, CVPR 2022): deterministic, any n, no pole clustering."""
    s = np.arange(n) + 0.5
    r, r_c = np.sqrt(s / n), np.sqrt(1.0 - s / n)
    alpha, beta = 2 * np.pi * s / np.sqrt(2.0), 2 * np.pi * s / 1.533751168755204288118041
    q = np.stack([r * np.sin(alpha), r * np.cos(alpha), r_c * np.sin(beta), r_c * np.cos(beta)], -1)
    return quaternion_to_matrix(q)


def nearest_rotation(mats: torch.Tensor) -> torch.Tensor:
    """The rotations (..., 3, 3) nearest (Frobenius) to matrices (..., 3, 3): U diag(1, 1, ±1) Vᵀ."""
    u, _, vt = torch.linalg.svd(mats)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1)
    return (u * fix[..., None, :]) @ vt


def grid_angles(mats: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Angles in radians (B, K) between rotations (B, 3, 3) and grid rotations (K, 3, 3)."""
    cos = (torch.einsum("bij,kij->bk", mats, grid) - 1.0) / 2.0
    return torch.arccos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6))


def grid_decode(
    logits: torch.Tensor, grid: torch.Tensor, radius_deg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations (B, 3, 3) and their spread (B,) in degrees from scores (B, K) over a rotation
    grid (K, 3, 3): the probability-weighted chordal mean of the grid points within `radius_deg`
    of the most probable one (a sub-grid estimate of the mode), and the expected angle between
    that estimate and the predicted distribution (large when the network is unsure)."""
    prob = torch.softmax(logits.float(), -1)
    top = grid[prob.argmax(-1)]
    near = grid_angles(top, grid) < np.deg2rad(radius_deg)
    rot = nearest_rotation(torch.einsum("bk,kij->bij", prob * near, grid))
    spread = torch.rad2deg((prob * grid_angles(rot, grid)).sum(-1))
    return rot, spread


def sixd_to_matrix(six: torch.Tensor) -> torch.Tensor:
    """RELION matrices A (..., 3, 3) from the continuous 6D representation (..., 6).

    The 6 numbers are the first two rows of A before orthonormalisation (Gram-Schmidt); the third
    row is their cross product, so every output is a proper rotation (Zhou et al., CVPR 2019).
    """
    a1, a2 = six[..., :3], six[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.linalg.cross(b1, b2)], dim=-2)


def matrix_to_sixd(mat: Array) -> Array:
    """The 6D representation (..., 6) of rotation matrices (..., 3, 3): their first two rows."""
    return mat[..., :2, :].reshape(*mat.shape[:-2], 6)


def matrix_distance_deg(m1: Array, m2: Array) -> Array:
    """Angle in degrees of the rotation between two orientations given as matrices (..., 3, 3)."""
    xp = _lib(m1)
    cos = ((m1 * m2).sum((-2, -1)) - 1.0) / 2.0
    return xp.rad2deg(xp.arccos(xp.clip(cos, -1.0, 1.0)))


def mean_rotation(mats: np.ndarray) -> np.ndarray:
    """The chordal L2 mean (3, 3) of rotation matrices (n, 3, 3): the rotation nearest their sum."""
    u, _, vt = np.linalg.svd(mats.sum(0))
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def separated(quat: torch.Tensor, n: int, min_deg: float) -> torch.Tensor:
    """Greedy choice, per row of candidates ordered best first (quat: (B, T, 4) unit
    quaternions), of the first `n` that are each more than `min_deg` from those chosen before;
    positions (B, n) in the rows, the last choice repeated when fewer qualify."""
    near = (quat @ quat.transpose(-1, -2)).abs() >= math.cos(math.radians(min_deg) / 2)
    free = torch.ones(quat.shape[:2], dtype=torch.bool, device=quat.device)
    rows = torch.arange(len(quat), device=quat.device)
    picks: list[torch.Tensor] = []
    for _ in range(n):
        first = free.float().argmax(1)  # the first free candidate
        pick = first if not picks else torch.where(free.any(1), first, picks[-1])
        picks.append(pick)
        free &= ~near[rows, pick]
        free[rows, pick] = False
    return torch.stack(picks, 1)
