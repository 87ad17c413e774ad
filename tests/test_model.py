import json
import subprocess
import sys

import numpy as np
import pandas as pd
import prody
import pytest

from deephemnma import model as m
from deephemnma import nma
from deephemnma import pseudo_atoms as pa
from deephemnma.cli import main as cli_main
from deephemnma.files import InputError
from deephemnma.flexible import FlexibleModel
from deephemnma.mrc import read_mrc

from .conftest import CLOSED_PDB, OPEN_PDB


def test_prepare_model_selects_centres_and_weights(adk_atoms):
    assert adk_atoms.numAtoms() == 1656  # heavy atoms of 4AKE chain A (214 residues)
    w = adk_atoms.getData("weight")
    np.testing.assert_allclose((w[:, None] * adk_atoms.getCoords()).sum(0) / w.sum(), 0, atol=1e-9)
    assert set(np.unique(adk_atoms.getElements())) == {"C", "N", "O", "S"}
    assert w[adk_atoms.getElements() == "S"][0] == 16
    ca = m.prepare_model(OPEN_PDB, "ca", None)
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
        x = FlexibleModel(x0, modes).deform(np.array(q))
        rmsd = np.sqrt(((x - x0) ** 2).sum(1).mean())
        # modes are orthonormal, so |sum q_k v_k| = |q|
        assert rmsd == pytest.approx(np.linalg.norm(q) / np.sqrt(n), rel=1e-9)


def test_ca_extension_gives_unit_modes(adk_atoms):
    _, _, modes = nma.compute_modes(adk_atoms, 3, 15.0, 1.0, coarse_above=100)
    np.testing.assert_allclose(np.linalg.norm(modes.reshape(3, -1), axis=1), 1.0, atol=1e-12)
    assert modes.shape == (3, adk_atoms.numAtoms(), 3)


def atom_group(coords, names, resnames, resnums, chain=""):
    ag = prody.AtomGroup("test")
    ag.setCoords(np.asarray(coords, dtype=float))
    ag.setNames(names)
    ag.setResnames(resnames)
    ag.setResnums(resnums)
    ag.setChids([chain] * len(names))
    return ag


def with_atom(atoms, xyz):
    """`atoms` plus one CA (residue ALA 999) at `xyz`."""
    return atom_group(
        np.vstack([atoms.getCoords(), xyz]),
        [*atoms.getNames(), "CA"],
        [*atoms.getResnames(), "ALA"],
        [*atoms.getResnums(), 999],
    )


def test_disconnected_network_is_an_error(adk_atoms):
    ca = adk_atoms.select("name CA").copy()
    far = with_atom(ca, ca.getCoords().max(0) + 100)
    with pytest.raises(
        InputError, match=r"at cutoff 15 Å falls into 2 parts: 1 atom\(s\) .*\(CA ALA 999\)"
    ):
        nma.compute_modes(far, 3, 15.0, 1.0, 5000)
    # a large model solved on its CA atoms: the residue far from the rest
    moved = adk_atoms.copy()
    xyz = moved.getCoords()
    xyz[moved.getResnums() == 214] += 100
    moved.setCoords(xyz)
    with pytest.raises(InputError, match=r"falls into 2 parts: 1 atom\(s\) .*\(CA GLY 214\)"):
        nma.compute_modes(moved, 3, 15.0, 1.0, coarse_above=100)
    waters = atom_group(
        np.arange(4)[:, None] * [30.0, 0, 0], ["O"] * 4, ["HOH"] * 4, [1, 2, 3, 4], "W"
    )
    with pytest.raises(
        InputError, match=r"4 parts: 3 atom\(s\) .*\(O HOH W2, O HOH W3, O HOH W4\)"
    ):
        nma.compute_modes(waters, 3, 15.0, 1.0, 5000)


def test_floppy_network_is_an_error(adk_atoms):
    """An atom held by one or two springs is connected but adds zero modes."""
    ca = adk_atoms.select("name CA").copy()
    xyz = ca.getCoords()
    for i in np.argsort(-np.linalg.norm(xyz, axis=1)):
        tip = xyz[i] * (1 + 14.5 / np.linalg.norm(xyz[i]))
        if np.sum(np.linalg.norm(xyz - tip, axis=1) < 15.0) in (1, 2):
            break
    else:
        pytest.fail("no outermost atom with one or two neighbours")
    with pytest.raises(InputError, match=r"mode 7 has a zero eigenvalue .*floppy parts"):
        nma.compute_modes(with_atom(ca, tip), 3, 15.0, 1.0, 5000)


def test_nma_cli_on_a_disconnected_model_fails_in_one_line(adk_atoms, tmp_path, capsys):
    ca = adk_atoms.select("name CA").copy()
    prody.writePDB(str(tmp_path / "far.pdb"), with_atom(ca, ca.getCoords().max(0) + 100))
    model = m.prepare_model(tmp_path / "far.pdb", "ca", None)
    m.save_model(model, tmp_path / "m.npz", tmp_path / "m.pdb")
    args = ["nma", "--model", tmp_path / "m.npz", "--pdb", tmp_path / "m.pdb"]
    for opt in ("npz", "nmd", "table", "anim-dir"):
        args += [f"--out-{opt}", tmp_path / "out" / opt]
    rc = cli_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{tmp_path / 'm.pdb'}: the elastic network at cutoff 15 Å falls into 2 parts" in err[0]
    assert not (tmp_path / "out").exists()


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
        m.prepare_model(tmp_path / "missing.pdb", "heavy", None)
    junk = tmp_path / "junk.pdb"
    junk.write_text("this is not a PDB file\n", encoding="utf-8")
    with pytest.raises(InputError, match="junk.pdb"):
        m.prepare_model(junk, "heavy", None)
    with pytest.raises(InputError, match="matched no atoms"):
        m.prepare_model(OPEN_PDB, "heavy", ["Z"])


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


def blobs(centres_voxel, sigma_voxel, box=32):
    """A map (box³) of unit-peak Gaussian blobs at `centres_voxel` (x, y, z)."""
    z, y, x = np.mgrid[:box, :box, :box].astype(float)
    return sum(
        np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_voxel**2))
        for cx, cy, cz in centres_voxel
    )


def test_pseudo_atoms_recover_gaussian_blobs():
    """Two blobs of the pseudo-atoms' own shape: found at their centres with weight 1, exactly."""
    vol = blobs([(10, 16, 16), (20, 16, 16)], np.sqrt(2))
    fit, _ = pa.fit_map(vol, 2.0, threshold=1e-4, sigma=2 * np.sqrt(2), n_atoms=2)
    order = np.argsort(fit.coords[:, 0])
    np.testing.assert_allclose(fit.coords[order], [[20, 32, 32], [40, 32, 32]], atol=0.3)
    np.testing.assert_allclose(fit.weights, 1.0, atol=0.05)
    target = np.where(vol > 1e-4, vol, 0.0)
    model = pa.render(fit.coords, fit.weights, vol.shape, 2.0, fit.sigma)
    err = np.sqrt(((target - model) ** 2).sum() / (target**2).sum())
    assert fit.relative_error == pytest.approx(err) and err < 0.01
    assert fit.correlation > 0.99


def test_pseudo_atoms_of_a_protein_map_reach_the_target(adk_atoms, tmp_path):
    """A 10 Å-ish map of AK: the count grows until the relative error is within the target; the
    workflow's prepare-model reads the pseudo-atoms with their weights."""
    from deephemnma.fsc import model_map
    from deephemnma.mrc import write_mrc

    vol = model_map(adk_atoms.getCoords(), adk_atoms.getData("weight"), 32, 4.4, 4.4)
    write_mrc(tmp_path / "ak.mrc", vol, 4.4)
    out = {k: str(tmp_path / f"out.{k}") for k in ("pdb", "mrc", "csv", "json", "png")}
    rc = cli_main(
        ["pseudo-atoms", "--map", str(tmp_path / "ak.mrc"), "--target-error", "0.12"]
        + ["--out-pdb", out["pdb"], "--out-map", out["mrc"], "--out-table", out["csv"]]
        + ["--out-json", out["json"], "--out-figure", out["png"]]
    )
    assert rc == 0
    summary = json.loads(open(out["json"], encoding="utf-8").read())
    print(summary)
    assert summary["relative_error"] <= 0.12 and summary["correlation"] > 0.98
    assert summary["correlation_whole_map"] > 0.95
    assert summary["sigma_angstrom"] == pytest.approx(4.4)
    simulated, voxel = read_mrc(out["mrc"])
    thr = summary["threshold"]
    target = np.where(vol > thr, vol, 0)
    assert voxel == pytest.approx(4.4)
    assert np.corrcoef(target.ravel(), simulated.ravel())[0, 1] == pytest.approx(
        summary["correlation"], abs=1e-4
    )
    assert np.corrcoef(vol.ravel(), simulated.ravel())[0, 1] == pytest.approx(
        summary["correlation_whole_map"], abs=1e-4
    )
    model = m.prepare_model(out["pdb"], "ca", None)
    assert model.numAtoms() == summary["pseudo_atoms"]
    w = model.getData("weight")
    assert w.mean() == pytest.approx(6.0, rel=0.01) and w.std() > 0.1
    with pytest.raises(InputError, match="turn it into pseudo-atoms first"):
        m.prepare_model(tmp_path / "ak.mrc", "heavy", None)


def test_choose_modes():
    coll = np.array([0.5, 0.1, 0.6, 0.2, 0.7, 0.8])
    assert nma.choose_modes(coll, 3).tolist() == [7, 8, 9]
    assert nma.choose_modes(coll, 3, min_collectivity=0.4).tolist() == [7, 9, 11]
    assert nma.choose_modes(coll, 2, numbers=[12, 8]).tolist() == [8, 12]
    with pytest.raises(InputError, match="only 2 of modes 7-12 have collectivity >= 0.65"):
        nma.choose_modes(coll, 3, min_collectivity=0.65)
    with pytest.raises(InputError, match="must be 7 or more, computed, once"):
        nma.choose_modes(coll, 3, numbers=[7, 13])
    assert nma.modes_to_compute(3, [7, 9, 12], 0.0, 20) == 6
    assert nma.modes_to_compute(3, None, 0.3, 20) == 20
    assert nma.modes_to_compute(3, None, 0.0, 20) == 3


def test_nma_cli_explicit_modes_and_overlap(tmp_path):
    ca = m.prepare_model(OPEN_PDB, "ca", None)
    m.save_model(ca, tmp_path / "model.npz", tmp_path / "model.pdb")
    args = ["nma", "--model", tmp_path / "model.npz", "--pdb", tmp_path / "model.pdb"]
    args += ["--modes", 7, 9, 12]
    args += ["--compare-to", CLOSED_PDB]
    for opt in ("npz", "nmd", "table", "anim-dir"):
        args += [f"--out-{opt}", tmp_path / opt]
    assert cli_main([str(a) for a in args]) == 0
    out = np.load(tmp_path / "npz")
    assert out["mode_numbers"].tolist() == [7, 9, 12]
    _, evals, modes = nma.compute_modes(ca, 6, 15.0, 1.0, 5000)
    np.testing.assert_allclose(out["eigenvalues"], evals[[0, 2, 5]])
    for k, j in enumerate((0, 2, 5)):  # same vectors up to sign
        assert abs((out["modes"][k] * modes[j]).sum()) == pytest.approx(1.0, abs=1e-6)
    table = pd.read_csv(tmp_path / "table")
    assert table["mode"].tolist() == list(range(7, 13))
    assert table["used"].tolist() == ["yes", "no", "yes", "no", "no", "yes"]
    assert {"eigenvalue", "collectivity", "overlap"} <= set(table)
    np.testing.assert_allclose(table["collectivity"][[0, 2, 5]], out["collectivity"], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "anim-dir").iterdir()) == [
        "mode12.pdb", "mode7.pdb", "mode9.pdb"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "modes, message",
    [
        (["7", "999"], "993 non-rigid modes asked for, but 214 atoms have only 636 (modes 7-642)"),
        (["7", "7"], "mode numbers [7, 7]: each must be 7 or more, computed, once"),
    ],
)
def test_nma_cli_refuses_modes_it_cannot_compute(adk_atoms, tmp_path, capsys, modes, message):
    model = m.prepare_model(OPEN_PDB, "ca", None)
    m.save_model(model, tmp_path / "m.npz", tmp_path / "m.pdb")
    args = ["nma", "--model", tmp_path / "m.npz", "--pdb", tmp_path / "m.pdb", "--modes", *modes]
    for opt in ("npz", "nmd", "table", "anim-dir"):
        args += [f"--out-{opt}", tmp_path / "out" / opt]
    rc = cli_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "volume, extra, message",
    [
        (np.ones((16, 16), np.float32), [], "not a 3D map (shape (16, 16))"),
        (None, ["--target-error", "-0.1"], "--target-error -0.1: must be positive"),
        (None, ["--sigma", "0"], "--sigma 0: must be positive"),
        (None, ["--n-atoms", "0"], "--n-atoms 0: must be at least 1"),
        ("no voxel size", [], "the header's voxel size is 0 Å (cell dimensions unset)"),
    ],
)
def test_pseudo_atoms_cli_refuses_bad_maps_and_targets(tmp_path, capsys, volume, extra, message):
    from deephemnma.mrc import write_mrc

    blob = blobs([(10, 16, 16), (20, 16, 16)], np.sqrt(2))
    vol = blob if volume is None or isinstance(volume, str) else volume
    write_mrc(tmp_path / "in.mrc", vol, 0.0 if isinstance(volume, str) else 2.0)
    out = [f"--out-{k}" for k in ("pdb", "map", "table", "json", "figure")]
    outs = [a for k in out for a in (k, str(tmp_path / "out" / k[6:]))]
    rc = cli_main(["pseudo-atoms", "--map", str(tmp_path / "in.mrc"), *extra, *outs])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
