from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from deephemnma import hemnma
from deephemnma import model as model_mod
from deephemnma import nma as nma_mod
from deephemnma.fit import FitSettings, fit_to_map, refined_modes, restrain
from deephemnma.flexible import FlexibleModel
from deephemnma.fsc import model_map

from .conftest import CLOSED_PDB

BOX, PX, SIGMA = 32, 4.4, 3.0


COARSE = 500  # modes on the CA atoms, extended to all: fast enough to recompute per round


@pytest.fixture(scope="module")
def open_closed(adk_atoms):
    """Open AK (3 modes) and closed AK superposed on it, as references."""
    refs = []
    for ag in (adk_atoms, model_mod.prepare_model(CLOSED_PDB, "heavy", None)):
        _, evals, modes = nma_mod.compute_modes(ag, 3, 15.0, 1.0, COARSE)
        weights = model_mod.scattering_weights(ag.getElements())
        refs.append(
            FlexibleModel(
                ag.getCoords(), modes, weights, np.arange(7, 10), evals, model_mod.atom_labels(ag)
            )
        )
    return refs[0], hemnma.superpose(refs[1], refs[0])


def rmsd(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


def test_refined_modes_at_the_model_match_its_own(open_closed):
    """Recomputed at the undeformed model, the modes are those of nma.compute_modes."""
    ref = open_closed[0]
    evals, modes = refined_modes(ref.coords, ref.atom_ids, 3, 15.0, 1.0, COARSE)
    a, b = modes.reshape(3, -1), ref.modes.reshape(3, -1)
    np.testing.assert_allclose(a * np.sign((a * b).sum(1))[:, None], b, atol=1e-6)  # up to sign
    np.testing.assert_allclose(evals, ref.eigenvalues, rtol=1e-6)


def test_fit_moves_the_open_model_to_the_closed_map(open_closed):
    """A reference update's core: fitted into a map of the closed form, the open model's RMSD to
    the closed structure falls from 7.0 Å to about its best fit on the modes (3.7 Å with 3)."""
    op, cl = open_closed
    start = rmsd(op.coords, cl.coords)
    fitted, cc = fit_to_map(
        op, model_map(cl.coords, cl.weights, BOX, PX, SIGMA), PX, SIGMA, 2, coarse_above=COARSE
    )
    end = rmsd(fitted.coords, cl.coords)
    print(f"RMSD to closed {start:.2f} -> {end:.2f} Å, correlation per round {np.round(cc, 4)}")
    assert start > 6.5 and end < 4.5 and cc[-1] > 0.93
    # fitted into its own map, the model stays where it is
    same, _ = fit_to_map(
        op, model_map(op.coords, op.weights, BOX, PX, SIGMA), PX, SIGMA, 1, coarse_above=COARSE
    )
    assert rmsd(same.coords, op.coords) < 0.3


def test_restrained_refinement_goes_beyond_the_modes_and_keeps_the_domains(open_closed):
    """From the open model's best fit on its 3 modes (3.7 Å from closed AK: their linear reach),
    restrained real-space refinement into the closed map moves it well closer (< 2.5 Å) while the
    springs keep the model's local distances (mean change < 0.3 Å over the pairs they hold); in
    its own map the model stays where it is."""
    from scipy.spatial import cKDTree

    op, cl = open_closed
    basis = op.modes.reshape(3, -1).T
    best = op.deform(np.linalg.lstsq(basis, (cl.coords - op.coords).ravel(), rcond=None)[0])
    closed_map = model_map(cl.coords, cl.weights, BOX, PX, SIGMA)
    coords, cc = restrain(best, op.coords, op.weights, closed_map, PX, SIGMA, 300)
    start, end = rmsd(best, cl.coords), rmsd(coords, cl.coords)
    print(f"RMSD to closed {start:.2f} -> {end:.2f} Å, correlation {cc:.4f}")
    assert 3.4 < start < 4.0 and end < 2.5 and cc > 0.95
    pairs = cKDTree(op.coords).query_pairs(FitSettings.restrain_within, output_type="ndarray")
    dist = lambda x: np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=-1)
    assert np.abs(dist(coords) - dist(op.coords)).mean() < 0.3
    own = model_map(op.coords, op.weights, BOX, PX, SIGMA)
    same, _ = restrain(op.coords, op.coords, op.weights, own, PX, SIGMA, 100)
    assert rmsd(same, op.coords) < 0.3
    # no atom pair within the springs' reach: no springs, the correlation alone (finite)
    free, _ = restrain(op.coords, op.coords, op.weights, own, PX, SIGMA, 10, within=0.1)
    assert np.isfinite(free).all() and rmsd(free, op.coords) < 0.5


def test_reference_update_moves_the_second_reference_toward_the_second_state(open_closed):
    """A reference update on a two-state set: noise-free images of open AK (2/3) and of a second
    state (1/3) aligned against the open model only; the images the quality flag marks are
    reconstructed with their poses and the open model fitted into that map: the fitted reference
    is closer to the second structure than the open model is (RMSD after CA superposition).

    The second state is halfway from open to closed AK (3.5 Å from open): particles of the full
    closed form get near-random poses against the open model (85° median here, also at low
    resolution), so their group map carries no closed density and the fit does not approach it
    (7.0 -> 7.9 Å): the update needs a first pass whose poses are roughly right."""
    from types import SimpleNamespace

    import torch

    from deephemnma import fit, geometry, simulate
    from deephemnma.gather import cost_z
    from deephemnma.io import amplitude_column

    op, cl = open_closed
    half = replace(cl, coords=op.coords + 0.5 * (cl.coords - op.coords))
    n, numbers = 36, np.arange(7, 10)
    cfg = simulate.SimulationSettings(box=BOX, pixel_size=PX, snr=None, ctf=False, seed=4)
    params = simulate.draw_parameters(n, numbers, cfg)
    for k in numbers:
        params[amplitude_column(int(k))] = 0.0
    state = (np.arange(n) % 3 == 0).astype(int)  # 1: the second state
    images = np.zeros((n, BOX, BOX), dtype=np.float32)
    for s, ref in enumerate((op, half)):
        rows = np.flatnonzero(state == s)
        images[rows] = simulate.render(ref.to(), params.iloc[rows], cfg, None)["final"].numpy()
    settings = hemnma.AlignSettings(
        coarse_box=BOX, n_directions=300, psi_step=15.0, iterations=(30, 40), max_shift_px=2.0
    )
    settings.sigma_angstrom = cfg.sigma_angstrom
    al = hemnma.Aligner(op, BOX, PX, settings, torch.device("cpu"))
    res = hemnma.align_best([al], images, {}, np.arange(n), False)
    true = params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    pose = geometry.euler_distance_deg(res["euler"], true)
    table = pd.DataFrame({"dhCost": res["cost"]})
    table["dhFlagged"] = (cost_z(table) > 3.0).astype(int)
    rows = fit.group_rows(table, "flagged", 0)
    ps = SimpleNamespace(
        images=images,
        ctf_params=lambda: {},
        euler=lambda: res["euler"],
        shifts_px=lambda: res["shifts_px"],
        box=BOX,
        pixel_size=PX,
        has_ctf=False,
    )
    volume = fit.group_map(ps, rows)
    s = fit.FitSettings(sigma_angstrom=SIGMA, rounds=2, box=0, coarse_above=COARSE)
    fitted, cc = fit.fit_reference(op, volume, PX, s)
    before = rmsd(hemnma.superpose(op, half).coords, half.coords)
    after = rmsd(hemnma.superpose(fitted, half).coords, half.coords)
    share = state[rows].mean()
    print(
        f"pose error median open {np.median(pose[state == 0]):.1f}°, second state "
        f"{np.median(pose[state == 1]):.1f}°; flagged {len(rows)} ({share:.0%} second state); "
        f"RMSD to it {before:.2f} -> {after:.2f} Å; correlation per round {np.round(cc, 3)}"
    )
    assert len(rows) >= 8 and share > 0.7
    assert after < 0.9 * before


def fit_cli(folder, model_dir, *options):
    """`deephemnma fit` on the open AK model files with `options`: (exit code, stderr)."""
    import subprocess
    import sys

    d = model_dir
    args = [sys.executable, "-m", "deephemnma", "fit", *map(str, options)]
    args += ["--model", d / "model.npz", "--modes", d / "modes.npz", "--pdb", d / "model.pdb"]
    args += ["--out-model", folder / "m.npz", "--out-modes", folder / "k.npz"]
    args += ["--out-pdb", folder / "m.pdb", "--rounds", "1", "--iterations", "20"]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    return r.returncode, r.stderr


@pytest.mark.parametrize(
    "shape, pixel, nan, message",
    [
        (None, 4.4, False, "map does not exist"),
        ((32, 32, 32), 4.4, True, "NaN/inf voxels"),
        ((32, 32, 32), 1.0, False, "does not hold the model"),
        ((32, 32, 16), 4.4, False, "not a cube"),
    ],
)
def test_fit_verb_rejects_bad_maps(tmp_path, adk_model_files, shape, pixel, nan, message):
    from deephemnma.mrc import write_mrc

    path = tmp_path / "map.mrc"
    if shape is not None:
        v = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        v[0, 0, 0] = np.nan if nan else v[0, 0, 0]
        write_mrc(path, v, pixel)
    code, err = fit_cli(tmp_path, adk_model_files, "--map", path)
    assert code == 2, err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], err
    assert not (tmp_path / "m.npz").exists()


def test_fit_verb_writes_a_reference_hemnma_reads(tmp_path, adk_model_files, open_closed):
    """Fitted into the closed map, the written reference loads as a second HEMNMA reference
    (same atoms, own modes) and sits closer to the closed structure than the open model."""
    from deephemnma.mrc import write_mrc

    op, cl = open_closed
    write_mrc(tmp_path / "map.mrc", model_map(cl.coords, cl.weights, BOX, PX, SIGMA), PX)
    code, err = fit_cli(tmp_path, adk_model_files, "--map", tmp_path / "map.mrc", "--box", "0")
    assert code == 0, err
    d = adk_model_files
    refs = hemnma.load_references(
        [str(d / "model.npz"), str(tmp_path / "m.npz")],
        [str(d / "modes.npz"), str(tmp_path / "k.npz")],
    )
    assert refs[1].modes.shape == refs[0].modes.shape
    assert rmsd(refs[1].coords, cl.coords) < rmsd(op.coords, cl.coords) - 1.0
    assert nma_mod.atoms_from_pdb(tmp_path / "m.pdb").numAtoms() == len(op.coords)
