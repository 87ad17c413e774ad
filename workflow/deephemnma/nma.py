"""nma: ANM normal modes of the prepared model with ProDy, in HEMNMA units.

The modes used are 7..6+n (default), an explicit list of mode numbers (e.g. 7, 9, 12), or a rule:
the first n modes whose collectivity is at least a threshold among modes 7..6+search. modes.npz
holds the chosen ones: ``coords`` (N, 3), ``modes`` (K, N, 3) — each unit-norm over all 3N
coordinates — ``mode_numbers`` (K,), ``eigenvalues`` (K,), ``eigenvalues_all`` (6 + M,) of every
mode computed (the six rigid-body ones first), ``collectivity`` (K,). Deformation:
x = x0 + sum_k q_k v_k. The table lists every mode computed, with ``used`` marking the choice.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import prody
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .files import InputError, atomic_path, require_file
from .flexible import FlexibleModel, load_model
from .model import read_structure, write_pdb

log = logging.getLogger(__name__)


def atoms_from_pdb(pdb: str | Path) -> prody.AtomGroup:
    """The cleaned model PDB written by prepare_model (same atom order as model.npz)."""
    return read_structure(pdb)


def atom_label(atom: prody.Atom) -> str:
    """'CA LYS A214': atom name, residue name, chain and residue number."""
    return f"{atom.getName()} {atom.getResname()} {atom.getChid().strip()}{atom.getResnum()}"


def check_connected(atoms: prody.AtomGroup, cutoff: float) -> None:
    """InputError naming the atoms outside the largest connected part of the elastic network.

    Springs join atoms closer than `cutoff`; each further part would add six zero modes.
    """
    coords = atoms.getCoords()
    pairs = cKDTree(coords).query_pairs(cutoff, output_type="ndarray")
    graph = coo_array((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(coords),) * 2)
    n_parts, labels = connected_components(graph, directed=False)
    if n_parts > 1:
        loose = np.nonzero(labels != np.bincount(labels).argmax())[0]
        names = ", ".join(atom_label(atoms[int(i)]) for i in loose[:5])
        raise InputError(
            f"the elastic network at cutoff {cutoff:g} Å falls into {n_parts} parts: "
            f"{len(loose)} atom(s) are not connected to the largest ({names}"
            f"{', ...' if len(loose) > 5 else ''}); remove them or raise the cutoff"
        )


def anm_modes(
    coords: np.ndarray, n_modes: int, cutoff: float, gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """ANM of `coords` (N, 3): eigenvalues (6 + n_modes,) and unit vectors (6 + n_modes, N, 3).

    Raises InputError if a mode beyond the six rigid-body ones has a zero eigenvalue (a network
    with floppy parts, e.g. atoms held by only one or two springs).
    """
    anm = prody.ANM("model")
    anm.buildHessian(coords, cutoff=cutoff, gamma=gamma)
    anm.calcModes(n_modes=n_modes + 6, zeros=True, turbo=True)
    evals = anm.getEigvals().copy()
    zero = np.nonzero(evals[6:] < prody.utilities.ZERO * gamma)[0]
    if len(zero):
        raise InputError(
            f"mode {7 + zero[0]} has a zero eigenvalue ({evals[6 + zero[0]]:.2g}): the elastic "
            f"network at cutoff {cutoff:g} Å has floppy parts; raise the cutoff"
        )
    return evals, anm.getEigvecs().T.reshape(-1, len(coords), 3)


def compute_modes(
    atoms: prody.AtomGroup, n_modes: int, cutoff: float, gamma: float, coarse_above: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Modes 7..6+n_modes in HEMNMA units for `atoms`.

    Returns (eigenvalues_all (6+K,), eigenvalues (K,), modes (K, N, 3)). Models with more than
    `coarse_above` atoms are solved on their CA atoms and extended to all atoms (ProDy extendModel).
    InputError if the elastic network is disconnected or floppy.
    """
    coords = atoms.getCoords()
    if len(coords) < 3:
        raise InputError(f"model has {len(coords)} atoms: too few for normal modes")
    ca = atoms.select("name CA")
    coarse = len(coords) > coarse_above and ca is not None and ca.numAtoms() >= 3
    n_solved = ca.numAtoms() if coarse else len(coords)
    if n_modes > 3 * n_solved - 6:
        raise InputError(
            f"{n_modes} non-rigid modes asked for, but {n_solved} atoms have only "
            f"{3 * n_solved - 6} (modes 7-{3 * n_solved})"
        )
    if coarse:
        check_connected(ca, cutoff)
        evals, vecs = anm_modes(ca.getCoords(), n_modes, cutoff, gamma)
        anm = prody.ANM("ca")
        anm.setEigens(vecs[6:].reshape(n_modes, -1).T, evals[6:])
        ext, _ = prody.extendModel(anm, ca, atoms, norm=True)
        modes = ext.getArray().T.reshape(n_modes, len(coords), 3)
    else:
        check_connected(atoms, cutoff)
        evals, vecs = anm_modes(coords, n_modes, cutoff, gamma)
        modes = vecs[6:]
    modes = modes / np.linalg.norm(modes.reshape(n_modes, -1), axis=1)[:, None, None]
    return evals, evals[6:], modes


def collectivity(modes: np.ndarray) -> np.ndarray:
    """Brüschweiler collectivity of each mode (K, N, 3), in (0, 1]."""
    p = (modes**2).sum(-1)
    p = p / p.sum(1, keepdims=True)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    return np.exp(ent) / modes.shape[1]


def choose_modes(
    collectivities: np.ndarray,
    n_modes: int,
    numbers: list[int] | None = None,
    min_collectivity: float = 0.0,
) -> np.ndarray:
    """Mode numbers (7, ...) to use, given the collectivity of modes 7, 8, ... (M,).

    `numbers` if given (each must have been computed); else the first `n_modes` modes with
    collectivity >= `min_collectivity`. InputError when the rule finds fewer.
    """
    computed = np.arange(7, 7 + len(collectivities))
    if numbers:
        missing = sorted(set(numbers) - set(computed.tolist()))
        if missing or min(numbers) < 7 or len(set(numbers)) < len(numbers):
            raise InputError(f"mode numbers {numbers}: each must be 7 or more, computed, once")
        return np.array(sorted(numbers))
    chosen = computed[collectivities >= min_collectivity][:n_modes]
    if len(chosen) < n_modes:
        raise InputError(
            f"only {len(chosen)} of modes 7-{computed[-1]} have collectivity >= "
            f"{min_collectivity:g} (need {n_modes}): lower the threshold or search more modes"
        )
    return chosen


def modes_to_compute(
    n_modes: int, numbers: list[int] | None, min_collectivity: float, search: int
) -> int:
    """How many non-rigid modes to compute for a choice (see choose_modes)."""
    if numbers:
        return max(numbers) - 6
    return max(search, n_modes) if min_collectivity > 0 else n_modes


def displacement_to(atoms: prody.AtomGroup, target: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Displacement from `atoms` to `target` over CA atoms matched by chain and residue number.

    The target is superposed on the model over those atoms first. Returns (indices into atoms, (M, 3)).
    """
    tgt = read_structure(target).select("name CA")
    if tgt is None:
        raise InputError(f"{target}: no CA atoms to compare with")
    index = {(a.getChid(), a.getResnum()): a.getCoords() for a in tgt}
    rows, xyz = [], []
    for i, a in enumerate(atoms):
        key = (a.getChid(), a.getResnum())
        if a.getName() == "CA" and key in index:
            rows.append(i)
            xyz.append(index[key])
    if len(rows) < 3:
        raise InputError(f"{target}: fewer than 3 CA atoms match the model")
    ref = atoms.getCoords()[rows]
    mob = np.array(xyz)
    mob_c, ref_c = mob - mob.mean(0), ref - ref.mean(0)
    u, _, vt = np.linalg.svd(mob_c.T @ ref_c)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1, 1, d]) @ vt
    return np.array(rows), mob_c @ rot + ref.mean(0) - ref


def overlaps(modes: np.ndarray, rows: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """|cos| between each mode restricted to `rows` and a displacement (M, 3)."""
    sub = modes[:, rows].reshape(len(modes), -1)
    sub = sub / np.linalg.norm(sub, axis=1, keepdims=True)
    return np.abs(sub @ disp.ravel()) / np.linalg.norm(disp)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model.npz from prepare-model")
    p.add_argument("--pdb", required=True, help="cleaned model PDB from prepare-model")
    p.add_argument("--n-modes", type=int, default=3, help="how many modes (7, 8, ... by default)")
    p.add_argument(
        "--modes", type=int, nargs="+", default=None, help="explicit mode numbers, e.g. 7 9 12"
    )
    p.add_argument(
        "--min-collectivity",
        type=float,
        default=0.0,
        help="use the first --n-modes modes with at least this collectivity",
    )
    p.add_argument("--search", type=int, default=20, help="modes 7..6+search for that rule")
    p.add_argument("--cutoff", type=float, default=15.0, help="ANM cutoff (Å)")
    p.add_argument("--gamma", type=float, default=1.0, help="ANM spring constant")
    p.add_argument(
        "--coarse-above",
        type=int,
        default=5000,
        help="solve on CA atoms and extend when the model has more atoms than this",
    )
    p.add_argument(
        "--animate-amplitude", type=float, default=150.0, help="amplitude of the ± animation frames"
    )
    p.add_argument("--compare-to", default=None, help="optional target structure for overlaps")
    p.add_argument("--out-npz", required=True, help="modes in HEMNMA units")
    p.add_argument("--out-nmd", required=True, help="NMWiz file")
    p.add_argument(
        "--out-table", required=True, help="eigenvalue, collectivity and overlap per mode (CSV)"
    )
    p.add_argument("--out-anim-dir", required=True, help="folder for the mode animations (PDB)")


def main(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    atoms = atoms_from_pdb(require_file(args.pdb, "model PDB"))
    if atoms.numAtoms() != len(model["coords"]):
        raise InputError(
            f"{args.pdb}: {atoms.numAtoms()} atoms but {args.model} has {len(model['coords'])}"
        )
    atoms.setCoords(model["coords"])
    n_computed = modes_to_compute(args.n_modes, args.modes, args.min_collectivity, args.search)
    try:
        evals_all, evals, modes = compute_modes(
            atoms, n_computed, args.cutoff, args.gamma, args.coarse_above
        )
        coll = collectivity(modes)
        numbers = choose_modes(coll, args.n_modes, args.modes, args.min_collectivity)
    except InputError as exc:
        raise InputError(f"{args.pdb}: {exc}") from exc
    table = pd.DataFrame(
        {"mode": np.arange(7, 7 + n_computed), "eigenvalue": evals, "collectivity": coll}
    )
    if args.compare_to:
        rows, disp = displacement_to(atoms, args.compare_to)
        table["overlap"] = overlaps(modes, rows, disp)
    table["used"] = np.where(table["mode"].isin(numbers), "yes", "no")
    log.info("normal modes (used: %s):\n%s", numbers.tolist(), table.to_string(index=False))
    pick = numbers - 7
    modes, evals = modes[pick], evals[pick]
    with atomic_path(args.out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            coords=model["coords"],
            modes=modes,
            mode_numbers=numbers,
            eigenvalues=evals,
            eigenvalues_all=evals_all,
            collectivity=coll[pick],
        )
    with atomic_path(args.out_table) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    nma = prody.NMA("deephemnma")
    nma.setEigens(modes.reshape(len(numbers), -1).T, evals)
    with atomic_path(args.out_nmd) as tmp:
        prody.writeNMD(str(tmp), nma, atoms)
    out = Path(args.out_anim_dir)
    steps = np.concatenate(
        [np.linspace(0, 1, 6), np.linspace(1, -1, 11)[1:], np.linspace(-1, 0, 6)[1:]]
    )
    flexible = FlexibleModel(model["coords"], modes)
    for k, number in enumerate(numbers):
        amplitudes = np.zeros((len(steps), len(numbers)))
        amplitudes[:, k] = args.animate_amplitude * steps
        frames = flexible.deform(amplitudes)
        write_pdb(out / f"mode{number}.pdb", atoms, frames)
