"""The flexible model: an atomic (or pseudo-atomic) model and its normal modes, as one object.

model.npz (written by prepare-model) holds ``coords`` (N, 3) in Å, centred, and the scattering
``weights`` (N,) (and ``atom_ids``, elements, ...); modes.npz (written by nma) holds the same
``coords``, the chosen ``modes`` (K, N, 3), each unit-norm over all 3N coordinates,
``mode_numbers`` (K,) and ``eigenvalues`` (K,). The deformation x = x₀ + Σₖ qₖ vₖ is
`FlexibleModel.deform`, the one place it is written (numpy or torch, batched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .files import InputError, require_file


def load_model(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read model.npz (coords, weights, elements, center) written by prepare-model."""
    with np.load(require_file(path, "model file")) as z:
        return {k: z[k] for k in z.files}


def load_modes(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read modes.npz written by nma."""
    with np.load(require_file(path, "modes file")) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class FlexibleModel:
    """coords (N, 3) in Å, modes (K, N, 3), weights (N,) (None when only modes.npz was read),
    mode_numbers (K,), eigenvalues (K,) (None when unknown), atom_ids (N,) 'chain:residue:name'
    labels (empty when unknown, e.g. pseudo-atoms). Arrays are numpy, or torch after `to`."""

    coords: Any
    modes: Any
    weights: Any = None
    mode_numbers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    eigenvalues: np.ndarray | None = None
    atom_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))

    @classmethod
    def load(cls, model_path: str | os.PathLike, modes_path: str | os.PathLike) -> FlexibleModel:
        """From model.npz and modes.npz (InputError if they do not belong together)."""
        model, modes = load_model(model_path), load_modes(modes_path)
        if modes["modes"].shape[1] != len(model["coords"]):
            raise InputError(
                f"{modes_path}: modes of {modes['modes'].shape[1]} atoms, "
                f"but {model_path} has {len(model['coords'])}"
            )
        return cls(
            model["coords"],
            modes["modes"],
            model["weights"],
            modes["mode_numbers"],
            modes["eigenvalues"],
            model.get("atom_ids", np.array([], dtype=str)),
        )

    @classmethod
    def from_modes(cls, modes_path: str | os.PathLike) -> FlexibleModel:
        """From modes.npz alone (its coords and modes; no weights)."""
        modes = load_modes(modes_path)
        return cls(
            modes["coords"], modes["modes"], None, modes["mode_numbers"], modes.get("eigenvalues")
        )

    @property
    def n_modes(self) -> int:
        return len(self.modes)

    def deform(self, amplitudes):
        """x₀ + Σₖ qₖ vₖ for amplitudes (..., K): coordinates (..., N, 3), numpy or torch as the
        model's arrays (torch amplitudes with a torch model, after `to`)."""
        if isinstance(self.coords, np.ndarray):
            return self.coords + np.tensordot(amplitudes, self.modes, axes=([-1], [0]))
        import torch

        return self.coords + torch.einsum("...k,knc->...nc", amplitudes, self.modes)

    def to(self, device=None, dtype=None) -> FlexibleModel:
        """coords, modes and weights as torch tensors (float32 unless `dtype`) on `device`."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        t = lambda a: None if a is None else torch.as_tensor(a, dtype=dtype, device=device)
        return replace(self, coords=t(self.coords), modes=t(self.modes), weights=t(self.weights))

    def coarsened(self, cell: float) -> tuple[FlexibleModel, float]:
        """The model as pseudo-atoms, one per occupied cube of `cell` Å: the weighted centroid
        of its atoms, their summed weight, and their weighted mean mode vectors (exact: under
        x₀ + Σₖ qₖ vₖ a centroid moves by its atoms' weighted mean displacement); with the atoms'
        weighted RMS per-axis distance from their centroid (Å), the width the pseudo-atoms add
        to the atoms'. Atoms of zero weight are left out. The mode vectors of the result are not
        unit-norm. Numpy arrays in and out."""
        if self.weights is None:
            raise ValueError("coarsening a model needs its atoms' weights")
        arr = lambda a: np.asarray(a.cpu() if hasattr(a, "cpu") else a, dtype=float)
        keep = arr(self.weights) > 0
        coords, modes, w = arr(self.coords)[keep], arr(self.modes)[:, keep], arr(self.weights)[keep]
        _, group = np.unique(np.floor(coords / cell).astype(np.int64), axis=0, return_inverse=True)
        group = group.ravel()
        total = np.bincount(group, w)
        mean = lambda a: (
            np.stack([np.bincount(group, w * a[:, j]) for j in range(a.shape[1])], 1)
            / total[:, None]
        )
        centre = mean(coords)
        spread = float(np.sqrt((w * ((coords - centre[group]) ** 2).sum(1)).sum() / (3 * w.sum())))
        pseudo = np.stack([mean(m) for m in modes])
        coarse = replace(
            self, coords=centre, modes=pseudo, weights=total, atom_ids=np.array([], dtype=str)
        )
        return coarse, spread

    def atoms(self, index: np.ndarray) -> FlexibleModel:
        """The model restricted to the atoms `index` (same modes, numbers and eigenvalues)."""
        ids = self.atom_ids[index] if len(self.atom_ids) == len(self.coords) else self.atom_ids
        weights = None if self.weights is None else self.weights[index]
        return replace(
            self,
            coords=self.coords[index],
            modes=self.modes[:, index],
            weights=weights,
            atom_ids=ids,
        )
