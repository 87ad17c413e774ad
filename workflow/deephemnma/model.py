"""prepare_model: an atomic model (PDB/mmCIF, or pseudo-atoms from an EM map) -> model.npz + PDB.

model.npz holds ``coords`` (N, 3) in Å centred on the scattering centre, ``weights`` (N,) (atomic
numbers), ``elements`` (N,), ``center`` (3,) the original-frame centre that was subtracted, and
``atom_ids`` (N,) 'chain:residue:name' labels that match atoms between models (empty for
pseudo-atoms, which match nothing).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import prody

from .io import InputError, atomic_path, read_mrc, require_file

log = logging.getLogger(__name__)

ATOMIC_NUMBER = {
    "H": 1,
    "C": 6,
    "N": 7,
    "O": 8,
    "P": 15,
    "S": 16,
    "SE": 34,
    "MG": 12,
    "ZN": 30,
    "CA": 20,
    "FE": 26,
    "MN": 25,
    "NA": 11,
    "K": 19,
    "CL": 17,
}
SELECTIONS = {"heavy": "not hydrogen", "ca": "name CA and protein", "all": "all"}

prody.confProDy(verbosity="warning")


def atom_selection(atoms: str, chains: list[str] | None) -> str:
    """ProDy selection string for an atom set ('heavy', 'ca', 'all') and optional chains."""
    sel = SELECTIONS[atoms]
    if chains:
        sel = f"({sel}) and chain {' '.join(chains)}"
    return sel


def read_structure(path: str | Path) -> prody.AtomGroup:
    """Parse a PDB or mmCIF file with ProDy; InputError if unreadable."""
    path = require_file(path, "structure")
    try:
        if path.suffix.lower() in (".cif", ".mmcif"):
            ag = prody.parseMMCIF(str(path))
        else:
            ag = prody.parsePDB(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot read structure ({exc})") from exc
    if ag is None or ag.numAtoms() == 0:
        raise InputError(f"{path}: no atoms could be read")
    return ag


def select_atoms(ag: prody.AtomGroup, selection: str, path: str | Path) -> prody.AtomGroup:
    """Copy of the atoms matching `selection`; InputError naming the file if none match."""
    sel = ag.select(selection)
    if sel is None or sel.numAtoms() == 0:
        raise InputError(f"{path}: selection '{selection}' matched no atoms")
    return sel.copy()


def element_names(atoms: prody.AtomGroup) -> np.ndarray:
    """Element symbols, taken from the file or guessed from atom names (first letter; ions whole)."""
    elements = atoms.getElements()
    names, resnames = atoms.getNames(), atoms.getResnames()
    out = []
    for el, name, res in zip(elements, names, resnames, strict=True):
        el = (el or "").strip().upper()
        if not el:
            stripped = name.strip().lstrip("0123456789").upper()
            el = stripped if stripped == res.strip().upper() else stripped[:1]
        out.append(el)
    return np.array(out)


def scattering_weights(elements: np.ndarray) -> np.ndarray:
    """Atomic numbers as per-atom scattering weights (6 for unknown elements)."""
    return np.array([ATOMIC_NUMBER.get(e, 6) for e in elements], dtype=np.float64)


def pseudo_atoms_from_map(
    density: np.ndarray, voxel_size: float, n_atoms: int, threshold: float, seed: int = 0
) -> np.ndarray:
    """Pseudo-atom positions (n_atoms, 3) in Å (x, y, z; origin at voxel 0) by density k-means."""
    from sklearn.cluster import KMeans

    zyx = np.argwhere(density > threshold)
    if len(zyx) < n_atoms:
        raise InputError(f"only {len(zyx)} voxels above threshold {threshold}; need {n_atoms}")
    xyz = zyx[:, ::-1].astype(np.float64) * voxel_size
    km = KMeans(n_clusters=n_atoms, n_init=1, random_state=seed)
    km.fit(xyz, sample_weight=density[tuple(zyx.T)])
    return km.cluster_centers_


def prepare_model(
    structure: str | Path,
    atoms: str,
    chains: list[str] | None,
    map_threshold: float | None,
    pseudo_atoms: int,
) -> prody.AtomGroup:
    """The selected, centred atoms as a ProDy AtomGroup (pseudo-atoms for an .mrc/.map input)."""
    path = Path(structure)
    if path.suffix.lower() in (".mrc", ".map"):
        density, voxel = read_mrc(path)
        if not np.isfinite(density).all():
            raise InputError(f"{path}: map contains NaN or Inf")
        thr = float(map_threshold if map_threshold is not None else density.mean() + density.std())
        xyz = pseudo_atoms_from_map(density, voxel, pseudo_atoms, thr)
        ag = prody.AtomGroup("pseudo-atoms")
        ag.setCoords(xyz)
        n = len(xyz)
        ag.setNames(["CA"] * n)
        ag.setResnames(["PSE"] * n)
        ag.setResnums(np.arange(1, n + 1))
        ag.setElements(["C"] * n)
        ag.setChids(["A"] * n)
        ag.setSerials(np.arange(1, n + 1))
    else:
        ag = select_atoms(read_structure(path), atom_selection(atoms, chains), path)
    coords = ag.getCoords().astype(np.float64)
    if not np.isfinite(coords).all():
        raise InputError(f"{path}: coordinates contain NaN or Inf")
    ag.setElements(element_names(ag))
    weights = scattering_weights(ag.getElements())
    center = (weights[:, None] * coords).sum(0) / weights.sum()
    ag.setCoords(coords - center)
    ag.setData("weight", weights)
    ag.setData("center", np.repeat(center[None], len(coords), 0))
    return ag


def atom_labels(ag: prody.AtomGroup) -> np.ndarray:
    """'chain:residue:name' per atom (e.g. 'A:12:CA'); empty for pseudo-atoms from a map."""
    if (ag.getResnames() == "PSE").all():
        return np.array([], dtype=str)
    parts = zip(ag.getChids(), ag.getResnums(), ag.getIcodes(), ag.getNames(), strict=True)
    return np.array([f"{c.strip()}:{r}{i.strip()}:{n.strip()}" for c, r, i, n in parts])


def save_model(ag: prody.AtomGroup, npz_path: str | Path, pdb_path: str | Path) -> None:
    """Write model.npz and the cleaned, centred PDB, each atomically."""
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                coords=ag.getCoords(),
                weights=ag.getData("weight"),
                elements=ag.getElements(),
                center=ag.getData("center")[0],
                atom_ids=atom_labels(ag),
            )
    write_pdb(pdb_path, ag, ag.getCoords()[None])


def write_pdb(path: str | Path, atoms: prody.AtomGroup, coordsets: np.ndarray) -> None:
    """Write `atoms` with one MODEL per coordinate set (M, N, 3), atomically."""
    ag = atoms.copy()
    ag.setCoords(np.asarray(coordsets, dtype=np.float64))
    with atomic_path(path) as tmp:
        prody.writePDB(str(tmp), ag)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structure", required=True, help="PDB/mmCIF file, or an EM map (.mrc/.map)")
    p.add_argument("--atoms", choices=sorted(SELECTIONS), default="heavy")
    p.add_argument("--chains", nargs="*", default=None, help="chain IDs (default: all)")
    p.add_argument("--map-threshold", type=float, default=None)
    p.add_argument("--pseudo-atoms", type=int, default=500)
    p.add_argument("--out-npz", required=True)
    p.add_argument("--out-pdb", required=True)


def main(args: argparse.Namespace) -> None:
    ag = prepare_model(
        args.structure, args.atoms, args.chains or None, args.map_threshold, args.pseudo_atoms
    )
    save_model(ag, args.out_npz, args.out_pdb)
    log.info(
        "model: %d atoms from %s, radius %.1f Å",
        ag.numAtoms(),
        args.structure,
        np.linalg.norm(ag.getCoords(), axis=1).max(),
    )
