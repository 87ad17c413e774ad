import subprocess
import sys

import numpy as np
import pytest

from deephemnma import model as m
from deephemnma import nma
from deephemnma.cli import main as cli_main
from deephemnma.io import InputError

from .conftest import CLOSED_PDB, OPEN_PDB


def test_prepare_model_selects_centres_and_weights(adk_atoms):
    assert adk_atoms.numAtoms() == 1656  # heavy atoms of 4AKE chain A (214 residues)
    w = adk_atoms.getData("weight")
    np.testing.assert_allclose((w[:, None] * adk_atoms.getCoords()).sum(0) / w.sum(), 0, atol=1e-9)
    assert set(np.unique(adk_atoms.getElements())) == {"C", "N", "O", "S"}
    assert w[adk_atoms.getElements() == "S"][0] == 16
    ca = m.prepare_model(OPEN_PDB, "ca", None, None, 500)
    assert ca.numAtoms() == 214


def test_eigenvalues_six_zero_then_positive(adk_modes):
    evals_all, evals, modes = adk_modes
    assert np.all(np.abs(evals_all[:6]) < 1e-6)
    assert np.all(evals_all[6:] > 1e-3) and np.all(np.diff(evals_all[6:]) > 0)
    np.testing.assert_allclose(evals, evals_all[6:])


def test_modes_unit_norm_and_deformation_rmsd(adk_atoms, adk_modes):
    _, _, modes = adk_modes
    np.testing.assert_allclose(np.linalg.norm(modes.reshape(3, -1), axis=1), 1.0, atol=1e-12)
    x0 = adk_atoms.getCoords()
    n = len(x0)
    for q in ([150.0, 0, 0], [0, -80.0, 0], [30.0, 40.0, 0.0]):
        x = nma.deform(x0, modes, np.array(q))
        rmsd = np.sqrt(((x - x0) ** 2).sum(1).mean())
        # modes are orthonormal, so |sum q_k v_k| = |q|
        assert rmsd == pytest.approx(np.linalg.norm(q) / np.sqrt(n), rel=1e-9)


def test_ca_extension_gives_unit_modes(adk_atoms):
    _, _, modes = nma.compute_modes(adk_atoms, 3, 15.0, 1.0, coarse_above=100)
    np.testing.assert_allclose(np.linalg.norm(modes.reshape(3, -1), axis=1), 1.0, atol=1e-12)
    assert modes.shape == (3, adk_atoms.numAtoms(), 3)


def test_open_to_closed_overlap(adk_atoms, adk_modes):
    _, _, modes = adk_modes
    rows, disp = nma.displacement_to(adk_atoms, CLOSED_PDB)
    assert len(rows) == 214
    assert np.sqrt((disp**2).sum(1).mean()) > 5.0  # open vs closed differ by ~7 Å RMSD over CA
    ov = nma.overlaps(modes, rows, disp)
    print(f"overlaps of modes 7, 8, 9 with open->closed: {np.round(ov, 3)}")
    assert ov.max() >= 0.7


def test_collectivity_bounds():
    one_atom = np.zeros((1, 10, 3))
    one_atom[0, 0, 0] = 1
    uniform = np.ones((1, 10, 3)) / np.sqrt(30)
    np.testing.assert_allclose(nma.collectivity(one_atom), 0.1)
    np.testing.assert_allclose(nma.collectivity(uniform), 1.0)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        m.prepare_model(tmp_path / "missing.pdb", "heavy", None, None, 500)
    junk = tmp_path / "junk.pdb"
    junk.write_text("this is not a PDB file\n")
    with pytest.raises(InputError, match="junk.pdb"):
        m.prepare_model(junk, "heavy", None, None, 500)
    with pytest.raises(InputError, match="matched no atoms"):
        m.prepare_model(OPEN_PDB, "heavy", ["Z"], None, 500)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "model.npz"
    rc = cli_main(
        [
            "prepare-model",
            "--structure",
            str(OPEN_PDB),
            "--chains",
            "Q",
            "--out-npz",
            str(out),
            "--out-pdb",
            str(tmp_path / "m.pdb"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "adk_open.pdb" in err[0] and "matched no atoms" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_lists_verbs():
    out = subprocess.run(
        [sys.executable, "-m", "deephemnma", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "prepare-model" in out and "nma" in out


def test_pseudo_atoms_from_map():
    # two Gaussian blobs 20 Å apart -> two pseudo-atoms at their centres
    z, y, x = np.mgrid[:32, :32, :32].astype(float)
    vol = np.exp(-((x - 10) ** 2 + (y - 16) ** 2 + (z - 16) ** 2) / 4)
    vol += np.exp(-((x - 20) ** 2 + (y - 16) ** 2 + (z - 16) ** 2) / 4)
    xyz = m.pseudo_atoms_from_map(vol, 2.0, 2, 0.1)
    xyz = xyz[np.argsort(xyz[:, 0])]
    np.testing.assert_allclose(xyz, [[20, 32, 32], [40, 32, 32]], atol=0.5)
