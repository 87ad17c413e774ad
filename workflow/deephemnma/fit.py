"""fit: flexible fitting of a reference (atomic model + normal modes) into a density map.

The model's density (Gaussian atoms, as `fsc.model_map`) is deformed along the modes and
moved rigidly (small rotation about its centre, translation) to maximise its normalised
correlation with the map (Adam). After each round the modes are recomputed at the fitted
structure (by `nma.compute_modes`' rule: ANM on all atoms, or above `coarse_above` atoms on the CA
atoms with each atom following its residue's CA), so later rounds follow the deformation beyond
the reach of the first modes. Linear modes still stop short of another state (the open AK
model's 3 modes reach 3.7 Å from closed AK), so the mode fit is followed by a restrained
real-space refinement (`restrain`): every atom moves to raise the correlation, held by springs
that keep the model's own local geometry (atom pairs within 7 Å), and the modes are recomputed
at the result. The result is a new reference with its own modes: the building block of a
reference update.

Reference update (the `fit` verb, one job per group): after a HEMNMA pass, the images of a group
(`flagged`: those the quality flag marks, or that chose an earlier fitted reference; or `kmeans`:
a k-means group of the amplitudes) are reconstructed with their poses (`reconstruct`'s code), the
main reference is fitted into that map, and the fitted model is written as a new reference
(model.npz, modes.npz with its own modes, PDB); the next pass aligns against the original and the
fitted references.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import torch

from .files import InputError, atomic_path, require_file
from .flexible import FlexibleModel, load_model
from .hemnma import skew
from .imaging import density, fourier_crop_volume
from .io import ParticleSet, amplitude_modes, unflagged
from .mrc import read_mrc, write_mrc
from .nma import anm_modes

log = logging.getLogger(__name__)

GROUPINGS = ("flagged", "kmeans")


@dataclass
class FitSettings:
    """Flexible-fitting settings of a reference update."""

    sigma_angstrom: float = 2.5  # atom Gaussian width of the model's density (Å)
    rounds: int = 3  # fits, the modes recomputed at the fitted structure after each
    iterations: int = 150  # Adam steps per round
    box: int = 48  # the map is Fourier-cropped to this box before fitting (0: as it is)
    cutoff: float = 15.0  # ANM cutoff of the recomputed modes (Å)
    gamma: float = 1.0
    coarse_above: int = 5000
    restrain_steps: int = 1000  # restrained real-space refinement after the mode fit (0: none)
    restrain_weight: float = 0.03  # its springs' weight against the correlation
    restrain_within: float = 7.0  # springs between atoms closer than this in the model (Å)


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


def unit_map(volume: np.ndarray) -> torch.Tensor:
    """A map (float64) with zero mean and unit norm: the target of `map_ncc`."""
    v = torch.as_tensor(np.asarray(volume), dtype=torch.float64) - float(volume.mean())
    return v / torch.linalg.norm(v)


def map_ncc(
    coords: torch.Tensor,
    weights: torch.Tensor,
    target: torch.Tensor,
    pixel_size: float,
    sigma_angstrom: float,
) -> torch.Tensor:
    """Normalised correlation of the density of Gaussian atoms at `coords` (N, 3) with a
    `unit_map` target (D, D, D); differentiable in the coordinates."""
    v = density(coords, weights, target.shape[0], pixel_size, sigma_angstrom)
    v = v - v.mean()
    return (v * target).sum() / torch.linalg.norm(v).clamp_min(1e-30)


def fit_once(
    ref: FlexibleModel,
    volume: np.ndarray,
    pixel_size: float,
    sigma_angstrom: float,
    iterations: int,
) -> tuple[np.ndarray, float]:
    """Coordinates (N, 3) of `ref` deformed along its modes and moved rigidly to fit `volume`
    (D, D, D) [z, y, x], centre at D // 2; and the final normalised correlation."""
    model = ref.to(dtype=torch.float64)
    target = unit_map(volume)
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
        return map_ncc(moved(), model.weights, target, pixel_size, sigma_angstrom)

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
    sigma_angstrom: float,
    rounds: int = FitSettings.rounds,
    iterations: int = FitSettings.iterations,
    cutoff: float = FitSettings.cutoff,
    gamma: float = FitSettings.gamma,
    coarse_above: int = FitSettings.coarse_above,
) -> tuple[FlexibleModel, list[float]]:
    """`ref` flexibly fitted into `volume`: `rounds` fits, the modes recomputed at the fitted
    structure after each. Returns the fitted reference (its own modes and eigenvalues, same atoms
    and weights) and the correlation after each round."""
    history = []
    k = len(ref.modes)
    for r in range(rounds):
        coords, cc = fit_once(ref, volume, pixel_size, sigma_angstrom, iterations)
        try:
            evals, modes = refined_modes(coords, ref.atom_ids, k, cutoff, gamma, coarse_above)
        except InputError as exc:  # torn apart by a map it does not fit: keep the last round's
            log.warning("fit round %d left a broken elastic network (%s): stopped there", r, exc)
            break
        history.append(cc)
        ref = replace(ref, coords=coords, modes=modes, eigenvalues=evals)
    return ref, history


def restrain(
    coords: np.ndarray,
    anchor: np.ndarray,
    weights: np.ndarray,
    volume: np.ndarray,
    pixel_size: float,
    sigma_angstrom: float,
    steps: int,
    weight: float = FitSettings.restrain_weight,
    within: float = FitSettings.restrain_within,
) -> tuple[np.ndarray, float]:
    """Restrained real-space refinement: every atom of `coords` (N, 3) moved to raise the
    normalised correlation of its density with `volume`, against harmonic springs that keep each
    pair of atoms closer than `within` Å in `anchor` (the given model) at its distance there (mean
    squared deviation in Å², times `weight`); `steps` Adam steps. The modes' linear reach stops a
    mode fit short of another state (3.7 Å from closed AK for the open model's 3 modes): the
    springs keep the domains' own geometry and let the hinges move (an atom with no neighbour
    within `within` has no spring). Returns the coordinates and the final correlation."""
    from scipy.spatial import cKDTree

    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)
    pairs = t(cKDTree(anchor).query_pairs(within, output_type="ndarray")).long()
    i, j = pairs[:, 0], pairs[:, 1]
    rest = torch.linalg.norm(t(anchor)[i] - t(anchor)[j], dim=-1)
    target, w = unit_map(volume), t(weights)
    x = t(coords).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    ncc = lambda: map_ncc(x, w, target, pixel_size, sigma_angstrom)
    for _ in range(steps):
        strain = ((torch.linalg.norm(x[i] - x[j], dim=-1) - rest) ** 2).sum() / max(len(i), 1)
        opt.zero_grad(set_to_none=True)
        (weight * strain - ncc()).backward()
        opt.step()
    with torch.no_grad():
        return x.numpy().copy(), float(ncc())


def crop_map(volume: np.ndarray, box: int) -> np.ndarray:
    """Fourier-crop a map (D, D, D) to (box, box, box) (box ≤ 0: unchanged)."""
    if box <= 0 or box >= volume.shape[0]:
        return volume
    v = torch.from_numpy(np.asarray(volume, dtype=np.float64))
    return fourier_crop_volume(v, box).float().numpy()


def check_map(volume: np.ndarray, pixel_size: float, ref: FlexibleModel, path: str) -> None:
    """InputError naming `path` unless the map is a finite cube, with a voxel size, whose box
    holds the model."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"{path}: map of shape {volume.shape}, not a cube")
    if not np.isfinite(volume).all():
        raise InputError(f"{path}: map has {int((~np.isfinite(volume)).sum())} NaN/inf voxels")
    if not pixel_size > 0:
        raise InputError(f"{path}: map has no voxel size (header says {pixel_size:g} Å)")
    radius = float(np.linalg.norm(ref.coords - ref.coords.mean(0), axis=1).max())
    side = volume.shape[0] * pixel_size
    if side < 2 * radius:
        raise InputError(
            f"{path}: box {volume.shape[0]} × {pixel_size:g} Å = {side:.1f} Å does not hold the "
            f"model ({2 * radius:.1f} Å across): wrong pixel size or box?"
        )
    if float(volume.std()) == 0.0:
        raise InputError(f"{path}: map is constant")


def group_rows(
    parts: pd.DataFrame,
    grouping: str,
    group: int,
    n_groups: int = 2,
    originals: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of group `group` of an aligned STAR's particle table.

    flagged (one group, 0): the images with `dhFlagged` = 1 or that chose a fitted reference
    (`dhReference` > `originals`, the references given by the user coming first);
    kmeans: k-means group `group` of `n_groups` on the amplitudes (ordered by PC1, as `space`)."""
    if grouping == "flagged":
        if group != 0:
            raise InputError(f"grouping flagged has one group (0), not {group}")
        mask = ~unflagged(parts)
        if "dhReference" in parts:
            mask |= parts["dhReference"].to_numpy() > originals
        return np.flatnonzero(mask)
    if grouping != "kmeans":
        raise InputError(f"grouping {grouping!r} is not one of {', '.join(GROUPINGS)}")
    if not 0 <= group < n_groups:
        raise InputError(f"group {group} is not one of 0..{n_groups - 1}")
    from .space import PCA, kmeans_groups

    cols = [f"dhAmplitudeMode{k}" for k in amplitude_modes(parts)]
    if not cols:
        raise InputError("no _dhAmplitudeMode<k> columns to group on")
    if len(parts) < n_groups:
        raise InputError(f"{len(parts)} images for {n_groups} groups")
    amps = parts[cols].to_numpy(np.float64)
    labels = kmeans_groups(PCA.fit(amps).transform(amps), n_groups, seed)
    return np.flatnonzero(labels == group)


def group_map(ps, rows: np.ndarray, seed: int = 0, tau2_fudge: float = 1.0) -> np.ndarray:
    """The map (D, D, D) of the particle rows `rows` of `ps` (a ParticleSet, or anything with
    its images, ctf_params(), euler(), shifts_px(), box, pixel_size, has_ctf)."""
    from .reconstruct import reconstruct_halves

    half = np.random.default_rng(seed).permutation(len(rows)) % 2
    return reconstruct_halves(ps, rows, half, tau2_fudge)[2]


def fit_reference(
    ref: FlexibleModel, volume: np.ndarray, pixel_size: float, s: FitSettings
) -> tuple[FlexibleModel, list[float]]:
    """`ref` fitted into `volume` (Fourier-cropped to `s.box` first) along its modes, then, with
    `s.restrain_steps`, refined atom by atom (`restrain`, springs from `ref`'s geometry) and its
    modes recomputed there. Returns the fitted reference and the correlation after each stage."""
    small = crop_map(volume, s.box)
    px = pixel_size * volume.shape[0] / small.shape[0]
    fitted, history = fit_to_map(
        ref, small, px, s.sigma_angstrom, s.rounds, s.iterations, s.cutoff, s.gamma, s.coarse_above
    )
    if s.restrain_steps == 0:
        return fitted, history
    coords, cc = restrain(
        fitted.coords, ref.coords, ref.weights, small, px, s.sigma_angstrom, s.restrain_steps,
        s.restrain_weight, s.restrain_within,
    )  # fmt: skip
    if not np.isfinite(coords).all():
        log.warning("the restrained refinement diverged: the mode fit is kept")
        return fitted, history
    try:
        evals, modes = refined_modes(
            coords, ref.atom_ids, len(ref.modes), s.cutoff, s.gamma, s.coarse_above
        )
    except InputError as exc:  # keep the mode fit's modes: a basis of nearly the same structure
        log.warning("modes at the refined structure failed (%s): the mode fit's are kept", exc)
        evals, modes = fitted.eigenvalues, fitted.modes
    return replace(fitted, coords=coords, modes=modes, eigenvalues=evals), [*history, cc]


def write_reference(
    ref: FlexibleModel, model: dict, pdb: str, out_model: str, out_modes: str, out_pdb: str
) -> None:
    """Write `ref` as a reference: model.npz (as prepare-model's `model`, new coordinates),
    modes.npz (its own modes 7..6+K, as nma writes) and the PDB (atoms of `pdb`)."""
    from .model import write_pdb
    from .nma import atoms_from_pdb, collectivity

    with atomic_path(out_model) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{**model, "coords": ref.coords})
    with atomic_path(out_modes) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            coords=ref.coords,
            modes=ref.modes,
            mode_numbers=np.arange(7, 7 + len(ref.modes)),
            eigenvalues=ref.eigenvalues,
            collectivity=collectivity(ref.modes),
        )
    atoms = atoms_from_pdb(require_file(pdb, "model PDB"))
    if atoms.numAtoms() != len(ref.coords):
        raise InputError(f"{pdb}: {atoms.numAtoms()} atoms but the model has {len(ref.coords)}")
    write_pdb(out_pdb, atoms, ref.coords[None])


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--map", help="density map (MRC) to fit the reference into")
    src.add_argument(
        "--particles",
        help="aligned HEMNMA STAR (gathered): the group's images are reconstructed and fitted",
    )
    p.add_argument("--model", required=True, help="model.npz of the reference to fit")
    p.add_argument("--modes", required=True, help="modes.npz of that reference")
    p.add_argument("--pdb", required=True, help="PDB of that reference (prepare-model)")
    p.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default="flagged",
        help="with --particles: flagged (the images flagged or on a fitted reference) or kmeans",
    )
    p.add_argument("--group", type=int, default=0, help="with --particles: the group to fit")
    p.add_argument("--n-groups", type=int, default=2, help="kmeans: number of groups")
    p.add_argument(
        "--originals",
        type=int,
        default=1,
        help="flagged: references given by the user (_dhReference above this: a fitted one)",
    )
    p.add_argument("--seed", type=int, default=0, help="k-means and half-set seed")
    p.add_argument(
        "--min-images",
        type=int,
        default=10,
        help="a group with fewer images keeps the reference as it is",
    )
    d = FitSettings()
    p.add_argument(
        "--sigma-angstrom", type=float, default=d.sigma_angstrom, help="atom Gaussian width (Å)"
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="fits, modes recomputed after each")
    p.add_argument("--iterations", type=int, default=d.iterations, help="Adam steps per round")
    p.add_argument(
        "--box", type=int, default=d.box, help="map Fourier-cropped to this box (0: as it is)"
    )
    p.add_argument("--cutoff", type=float, default=d.cutoff, help="ANM cutoff (Å)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="ANM spring constant")
    p.add_argument(
        "--coarse-above",
        type=int,
        default=d.coarse_above,
        help="modes on the CA atoms above this many atoms",
    )
    p.add_argument(
        "--restrain-steps",
        type=int,
        default=d.restrain_steps,
        help="restrained real-space refinement steps after the mode fit (0: none)",
    )
    p.add_argument(
        "--restrain-weight",
        type=float,
        default=d.restrain_weight,
        help="weight of its springs (mean squared deviation, Å²) against the correlation",
    )
    p.add_argument(
        "--restrain-within",
        type=float,
        default=d.restrain_within,
        help="springs between atoms closer than this in the model (Å)",
    )
    p.add_argument("--out-model", required=True, help="fitted model.npz")
    p.add_argument("--out-modes", required=True, help="its own modes (modes.npz)")
    p.add_argument("--out-pdb", required=True, help="fitted model (PDB)")
    p.add_argument("--out-map", default=None, help="with --particles: the group's map (MRC)")
    p.add_argument("--out-json", default=None, help="group size, correlations, RMSD moved")


def main(args: argparse.Namespace) -> None:
    for name in ("rounds", "iterations", "n_groups", "min_images"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.box < 0 or args.sigma_angstrom <= 0:
        raise InputError("--box must be >= 0 and --sigma-angstrom > 0")
    ref = FlexibleModel.load(args.model, args.modes)
    model = load_model(args.model)
    if args.restrain_steps < 0 or args.restrain_weight < 0 or args.restrain_within <= 0:
        raise InputError(
            "--restrain-steps and --restrain-weight must be >= 0 and --restrain-within > 0"
        )
    settings = FitSettings(**{f.name: getattr(args, f.name) for f in fields(FitSettings)})
    info: dict = {"grouping": args.grouping, "group": args.group}
    if args.map is not None:
        volume, px = read_mrc(require_file(args.map, "map"))
        check_map(volume, px, ref, args.map)
        n = None
    else:
        ps = ParticleSet(require_file(args.particles, "aligned STAR"))
        try:
            rows = group_rows(
                ps.particles, args.grouping, args.group, args.n_groups, args.originals, args.seed
            )
        except InputError as exc:
            raise InputError(f"{args.particles}: {exc}") from None
        n, px = len(rows), ps.pixel_size
        volume = group_map(ps, rows, args.seed) if n >= 2 else np.zeros((ps.box,) * 3, np.float32)
        if args.out_map:
            write_mrc(args.out_map, volume, px)
        if n >= args.min_images:
            check_map(volume, px, ref, args.particles)
    info["images"] = n
    if n is not None and n < args.min_images:
        log.warning(
            "group %d (%s) has %d images (< %d): the reference is kept as it is",
            args.group,
            args.grouping,
            n,
            args.min_images,
        )
        fitted, history = ref, []
    else:
        fitted, history = fit_reference(ref, volume, px, settings)
    moved = float(np.sqrt(((fitted.coords - ref.coords) ** 2).sum(-1).mean()))
    info.update(correlation=history, rmsd_moved=moved, n_atoms=len(ref.coords))
    write_reference(fitted, model, args.pdb, args.out_model, args.out_modes, args.out_pdb)
    if args.out_json:
        with atomic_path(args.out_json) as tmp:
            tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    log.info(
        "fitted the reference into the map of %s images: correlation per round %s (the last "
        "after the restrained refinement, if on), moved %.2f Å RMSD",
        "the given" if n is None else n,
        np.round(history, 4).tolist(),
        moved,
    )
