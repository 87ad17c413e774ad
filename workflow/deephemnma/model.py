"""prepare_model: an atomic model (PDB/mmCIF, or pseudo-atoms from an EM map) -> model.npz + PDB.

An EM map goes through `deephemnma pseudo-atoms` first (the workflow does it).

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

from .files import InputError, atomic_path, require_file
from .pseudo_atoms import RESNAME

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


def is_map(path: str | Path) -> bool:
    """Whether `path` names an EM map (.mrc/.map) rather than an atomic model."""
    return Path(path).suffix.lower() in (".mrc", ".map")


def is_pseudo(ag: prody.AtomGroup) -> bool:
    """Whether `ag` holds pseudo-atoms (residue PSE, written by `deephemnma pseudo-atoms`)."""
    return bool((ag.getResnames() == RESNAME).all())


def prepare_model(structure: str | Path, atoms: str, chains: list[str] | None) -> prody.AtomGroup:
    """The selected, centred atoms as a ProDy AtomGroup.

    Pseudo-atoms (from `deephemnma pseudo-atoms`) are kept whole, weighted by their occupancy
    (relative weight) × 6; atoms by their atomic number.
    """
    path = Path(structure)
    if is_map(path):
        raise InputError(
            f"{path}: an EM map; turn it into pseudo-atoms first (deephemnma pseudo-atoms)"
        )
    ag = read_structure(path)
    pseudo = is_pseudo(ag)
    if not pseudo:
        ag = select_atoms(ag, atom_selection(atoms, chains), path)
    coords = ag.getCoords().astype(np.float64)
    if not np.isfinite(coords).all():
        raise InputError(f"{path}: coordinates contain NaN or Inf")
    ag.setElements(element_names(ag))
    weights = scattering_weights(ag.getElements())
    if pseudo:
        weights = weights * ag.getOccupancies()
    center = (weights[:, None] * coords).sum(0) / weights.sum()
    ag.setCoords(coords - center)
    ag.setData("weight", weights)
    ag.setData("center", np.repeat(center[None], len(coords), 0))
    return ag


def atom_labels(ag: prody.AtomGroup) -> np.ndarray:
    """'chain:residue:name' per atom (e.g. 'A:12:CA'); empty for pseudo-atoms from a map."""
    if is_pseudo(ag):
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
    p.add_argument("--structure", required=True, help="PDB/mmCIF file (atoms or pseudo-atoms)")
    p.add_argument("--atoms", choices=sorted(SELECTIONS), default="heavy", help="atoms to keep")
    p.add_argument("--chains", nargs="*", default=None, help="chain IDs (default: all)")
    p.add_argument("--out-npz", required=True, help="centred coordinates and scattering weights")
    p.add_argument("--out-pdb", required=True, help="the selected, centred atoms (PDB)")


def main(args: argparse.Namespace) -> None:
    ag = prepare_model(args.structure, args.atoms, args.chains or None)
    save_model(ag, args.out_npz, args.out_pdb)
    log.info(
        "model: %d atoms from %s, radius %.1f Å",
        ag.numAtoms(),
        args.structure,
        np.linalg.norm(ag.getCoords(), axis=1).max(),
    )
