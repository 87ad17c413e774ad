"""fit: flexible fitting of a reference (atomic model + normal modes) into a density map.

The model's density (Gaussian atoms, as `fsc.model_map`) is deformed along the modes and
moved rigidly (small rotation about its centre, translation) to maximise its normalised
correlation with the map (Adam). After each round the modes are recomputed at the fitted
structure (by `nma.compute_modes`' rule: ANM on all atoms, or above `coarse_above` atoms on the CA
atoms with each atom following its residue's CA), so later rounds follow the deformation beyond
the reach of the first modes. The
result is a new reference with its own modes: the building block of a reference update (fit the
model into a group's map, align again against the fitted model).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .flexible import FlexibleModel
from .fsc import density
from .hemnma import skew
from .nma import anm_modes


def refined_modes(
    coords: np.ndarray,
    atom_ids: np.ndarray,
    n_modes: int,
    cutoff: float,
    gamma: float,
    coarse_above: int,
) -> tuple[np.ndarray, np.ndarray]:
    """ANM modes 7..6+n_modes at `coords`: (eigenvalues (K,), unit-norm modes (K, N, 3)).

    As `nma.compute_modes`: above `coarse_above` atoms, solved on the CA atoms (labels
    'chain:residue:CA') with every atom following its residue's CA; else on all atoms."""
    ids = np.asarray(atom_ids).astype(str)
    ca = np.char.endswith(ids, ":CA") if len(ids) == len(coords) else np.zeros(0, dtype=bool)
    if len(coords) > coarse_above and ca.sum() >= 3:
        residue = np.array([s.rsplit(":", 1)[0] for s in ids])
        index = {r: i for i, r in enumerate(residue[ca])}
        if all(r in index for r in residue):
            evals, vecs = anm_modes(coords[ca], n_modes, cutoff, gamma)
            modes = vecs[6:][:, [index[r] for r in residue]]
        else:
            evals, vecs = anm_modes(coords, n_modes, cutoff, gamma)
            modes = vecs[6:]
    else:
        evals, vecs = anm_modes(coords, n_modes, cutoff, gamma)
        modes = vecs[6:]
    modes = modes / np.linalg.norm(modes.reshape(n_modes, -1), axis=1)[:, None, None]
    return evals[6:], modes


def fit_once(
    ref: FlexibleModel,
    volume: np.ndarray,
    pixel_size: float,
    sigma_angstrom: float,
    iterations: int,
) -> tuple[np.ndarray, float]:
    """Coordinates (N, 3) of `ref` deformed along its modes and moved rigidly to fit `volume`
    (D, D, D) [z, y, x], centre at D // 2; and the final normalised correlation."""
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    model = ref.to(dtype=torch.float64)
    box = volume.shape[0]
    target = t(volume) - float(volume.mean())
    target = target / torch.linalg.norm(target)
    amp = torch.zeros(model.n_modes, dtype=torch.float64, requires_grad=True)
    omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    shift = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam(
        [
            {"params": [amp], "lr": 5.0},
            {"params": [omega], "lr": 0.01},
            {"params": [shift], "lr": 0.2},
        ]
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=0.0)
    centre = model.coords.mean(0)

    def moved() -> torch.Tensor:
        return (
            (model.deform(amp) - centre) @ torch.linalg.matrix_exp(skew(omega)).T + centre + shift
        )

    def ncc() -> torch.Tensor:
        v = density(moved(), model.weights, box, pixel_size, sigma_angstrom)
        v = v - v.mean()
        return (v * target).sum() / torch.linalg.norm(v).clamp_min(1e-30)

    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        (-ncc()).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return moved().numpy(), float(ncc())


def fit_to_map(
    ref: FlexibleModel,
    volume: np.ndarray,
    pixel_size: float,
    sigma_angstrom: float = 3.0,
    rounds: int = 3,
    iterations: int = 150,
    cutoff: float = 15.0,
    gamma: float = 1.0,
    coarse_above: int = 5000,
) -> tuple[FlexibleModel, list[float]]:
    """`ref` flexibly fitted into `volume`: `rounds` fits, the modes recomputed at the fitted
    structure after each. Returns the fitted reference (its own modes and eigenvalues, same atoms
    and weights) and the correlation after each round."""
    history = []
    k = len(ref.modes)
    for _ in range(rounds):
        coords, cc = fit_once(ref, volume, pixel_size, sigma_angstrom, iterations)
        history.append(cc)
        evals, modes = refined_modes(coords, ref.atom_ids, k, cutoff, gamma, coarse_above)
        ref = replace(ref, coords=coords, modes=modes, eigenvalues=evals)
    return ref, history
