import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma import geometry, hemnma, imaging
from deephemnma.cli import main as cli
from deephemnma.files import InputError
from deephemnma.flexible import FlexibleModel, load_model
from deephemnma.io import ParticleSet
from deephemnma.shard import shard_rows


def simulate(d, files, n, box, px, ctf, seed):
    cwd = os.getcwd()
    os.chdir(d)
    try:
        args = [
            "simulate",
            "--model",
            str(files / "model.npz"),
            "--modes",
            str(files / "modes.npz"),
            "--n-images",
            str(n),
            "--box",
            str(box),
            "--pixel-size",
            str(px),
            "--max-shift-px",
            "2",
            "--seed",
            str(seed),
            "--out-star",
            "p.star",
            "--out-stacks",
            "s",
        ] + ([] if ctf else ["--no-ctf"])
        assert cli(args) == 0
    finally:
        os.chdir(cwd)
    return d / "p.star"


def errors(ps, res):
    ang = geometry.euler_distance_deg(res["euler"], ps.euler())
    amp = np.abs(res["amplitudes"] - ps.amplitudes([7, 8, 9]))
    shift = np.linalg.norm(res["shifts_px"] - ps.shifts_px(), axis=1)
    return ang, amp, shift


@pytest.mark.parametrize("ctf", [False, True])
def test_noise_free_recovery(adk_model_files, tmp_path, monkeypatch, ctf):
    star = simulate(tmp_path, adk_model_files, 8, 48, 3.0, ctf, seed=11)
    monkeypatch.chdir(tmp_path)
    ps = ParticleSet(star)
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    settings = hemnma.AlignSettings(iterations=(30, 60))
    al = hemnma.Aligner(model, ps.box, ps.pixel_size, settings, torch.device("cpu"))
    res = hemnma.align_rows(ps, np.arange(len(ps)), al)
    ang, amp, shift = errors(ps, res)
    print(
        f"noise-free (ctf={ctf}): angle {ang.mean():.2f} deg, |amp err| {amp.mean(0).round(2)}, "
        f"shift {shift.mean():.3f} px"
    )
    assert ang.max() < 1.5 and ang.mean() < 0.6
    assert amp.mean() < 3.0 and amp.max() < 12.0  # amplitudes span ±150
    assert shift.max() < 0.2
    assert res["cost"].max() < 0.02


def test_a_batch_gives_what_one_image_at_a_time_gives(adk_model_files, tmp_path, monkeypatch):
    """Batching cannot change the answer: 6 images in one batch = each image alone (1e-3)."""
    star = simulate(tmp_path, adk_model_files, 6, 32, 4.4, True, seed=5)
    monkeypatch.chdir(tmp_path)
    ps = ParticleSet(star)
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    settings = hemnma.AlignSettings(coarse_box=16, n_directions=100, iterations=(8, 12))
    out = []
    for batch in (6, 1):
        al = hemnma.Aligner(
            model, ps.box, ps.pixel_size, replace(settings, batch=batch), torch.device("cpu")
        )
        out.append(hemnma.align_rows(ps, np.arange(len(ps)), al))
    for key in ("euler", "shifts_px", "amplitudes", "cost"):
        np.testing.assert_allclose(out[0][key], out[1][key], atol=1e-3, err_msg=key)


def test_global_search_finds_the_orientation(adk_model_files, tmp_path, monkeypatch):
    star = simulate(tmp_path, adk_model_files, 6, 32, 4.4, True, seed=2)
    monkeypatch.chdir(tmp_path)
    ps = ParticleSet(star)
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    settings = hemnma.AlignSettings(n_directions=400, psi_step=10, candidates=3)
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    gallery = hemnma.Gallery(model.to(), 32, 4.4, settings)
    target = hemnma.make_target(t(ps.images[:]), ps.ctf_params(), np.arange(6), 32, 4.4, True)
    eul, _, amps = hemnma.global_search(target, gallery, settings, 32)
    assert amps.shape == (6, 3, 3) and set(np.unique(amps)) <= {-100.0, 0.0, 100.0}
    best = np.array([geometry.euler_distance_deg(eul[i], ps.euler()[i]).min() for i in range(6)])
    # the grid spacing is about 10 degrees; amplitudes up to ±150 are not modelled in the search
    assert np.median(best) < 12.0


def test_retry_searches_the_worst_explained_images_again(adk_model_files, tmp_path, monkeypatch):
    """Images 2 and 5 are offered only orientations 90° off by the first search and stay
    unexplained: a retry share of 1/4 searches exactly those two again, with retry_candidates
    candidates, and finds them; the other images keep the first answer exactly. No retry when
    it would search no more candidates than the first search."""
    star = simulate(tmp_path, adk_model_files, 8, 32, 4.4, True, seed=3)
    monkeypatch.chdir(tmp_path)
    ps = ParticleSet(star)
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    real, calls = hemnma.global_search, []

    def spoiled(target, gallery, settings, full_box):
        eul, sh, amp = real(target, gallery, settings, full_box)
        calls.append((len(target.images_f), settings.candidates))
        if settings.candidates == 2:  # the first search
            eul[[2, 5], :, 1] += 90.0
        return eul, sh, amp

    monkeypatch.setattr(hemnma, "global_search", spoiled)
    settings = hemnma.AlignSettings(candidates=2, retry_candidates=6, iterations=(20, 30))
    align = lambda **kw: hemnma.align_rows(
        ps,
        np.arange(len(ps)),
        hemnma.Aligner(model, 32, 4.4, replace(settings, **kw), torch.device("cpu")),
    )
    first = align(retry=0.0)
    res = align(retry=0.25)
    assert calls == [(8, 2), (8, 2), (2, 6)]
    calls.clear()
    align(retry=0.25, retry_candidates=2)  # no more candidates than the first search: no retry
    assert calls == [(8, 2)]
    before = geometry.euler_distance_deg(first["euler"], ps.euler())
    after = geometry.euler_distance_deg(res["euler"], ps.euler())
    print(f"first search {before.round(1)}; after the retry {after.round(1)}")
    assert before[[2, 5]].min() > 30.0 and after.max() < 1.5
    assert (res["objective"][[2, 5]] < first["objective"][[2, 5]]).all()
    for key in ("euler", "amplitudes", "objective"):
        np.testing.assert_array_equal(
            np.delete(res[key], [2, 5], 0), np.delete(first[key], [2, 5], 0)
        )


def test_separated_candidates_follow_the_greedy_rule():
    """Each row's choice equals the greedy loop written out: walk the candidates best first,
    keep one if it is more than the separation from every one kept, repeat the last if short."""
    rng = np.random.default_rng(0)
    euler = rng.uniform(-180, 180, (5, 40, 3)) * np.array([1, 0.25, 1])  # crowded in tilt
    quat = geometry.euler_to_quaternion(euler)
    got = geometry.separated(torch.tensor(quat), 4, 30.0).numpy()
    for b in range(5):
        kept: list[int] = []
        for m in range(40):
            d = [geometry.quaternion_distance_deg(quat[b, m], quat[b, p]) for p in kept]
            if all(x > 30.0 for x in d):
                kept.append(m)
            if len(kept) == 4:
                break
        kept += [kept[-1]] * (4 - len(kept))
        assert got[b].tolist() == kept
    # all candidates in one place: the first, repeated
    same = torch.tensor(np.repeat(quat[:1, :1], 6, 1))
    assert geometry.separated(same, 3, 10.0).tolist() == [[0, 0, 0]]


def test_gallery_rotation_matches_projection(adk_model_files):
    m = load_model(adk_model_files / "model.npz")
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    settings = hemnma.AlignSettings(n_directions=20, psi_step=30, gallery_amplitude=0.0)
    rigid = FlexibleModel(t(m["coords"]), torch.zeros(3, len(m["coords"]), 3), t(m["weights"]))
    g = hemnma.Gallery(rigid, 32, 4.4, settings)
    from deephemnma import imaging

    rot = geometry.euler_to_matrix(t(g.euler))
    direct = imaging.project(
        t(m["coords"]), rot, torch.zeros(len(rot), 2), t(m["weights"]), 32, 4.4, 4.4
    )
    k = direct.shape[-1] // 2 + 1
    flat = g.flat.T.reshape(-1, 32, 2 * k)  # rows of (real parts, imaginary parts)
    gal = torch.complex(flat[..., :k], flat[..., k:])
    a, b = torch.fft.irfft2(gal, s=(32, 32)).flatten(1), direct.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.min() > 0.97


def test_coarsened_model_moves_and_projects_as_its_atoms(adk_model_files):
    """Pseudo-atoms of 6 Å cells: each is its atoms' weighted centroid (written out per cell
    here) before and after a deformation, weights add up, the spread is the atoms' RMS per-axis
    distance from their centroid; at the coarse box (4.4 Å/px) their projection with that
    spread added matches the atoms' (NCC > 0.998), much better than without it."""
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    coarse, spread = model.coarsened(6.0)
    assert 100 < len(coarse.coords) < len(model.coords) / 5
    q = np.array([120.0, -90.0, 60.0])
    cells: dict[tuple, list[int]] = {}
    for i, c in enumerate(np.floor(model.coords / 6.0).astype(int)):
        cells.setdefault(tuple(c), []).append(i)
    w, x, y = model.weights, model.coords, model.deform(q)
    centres = {tuple(np.round((w[i] @ x[i]) / w[i].sum(), 6)): i for i in cells.values()}
    assert len(centres) == len(coarse.coords) and np.isclose(coarse.weights.sum(), w.sum())
    sq = 0.0
    for centre, moved, weight in zip(coarse.coords, coarse.deform(q), coarse.weights, strict=True):
        i = centres[tuple(np.round(centre, 6))]
        np.testing.assert_allclose(moved, (w[i] @ y[i]) / w[i].sum(), atol=1e-9)
        assert np.isclose(weight, w[i].sum())
        sq += w[i] @ ((x[i] - centre) ** 2).sum(1)
    assert np.isclose(spread, np.sqrt(sq / (3 * w.sum())))
    # an atom of zero weight alone in its cube adds nothing (no 0/0 pseudo-atom)
    lone = replace(
        model,
        coords=np.vstack([model.coords, [[500.0, 500.0, 500.0]]]),
        modes=np.concatenate([model.modes, np.ones((3, 1, 3))], 1),
        weights=np.append(model.weights, 0.0),
    )
    again, spread_again = lone.coarsened(6.0)
    np.testing.assert_array_equal(again.coords, coarse.coords)
    assert spread_again == spread

    euler = torch.tensor([[10.0, 50.0, 30.0], [200.0, 120.0, -70.0]])
    rot, shift = geometry.euler_to_matrix(euler), torch.zeros(2, 2)
    amp = torch.tensor(q, dtype=torch.float32).expand(2, 3)
    settings = hemnma.AlignSettings()
    atoms, pseudo = model.to(), coarse.to()
    ones = torch.ones(2, 32, 17)
    image = hemnma.Target(ones, ones, 32, 4.4)
    sigma, filt, _ = image.model_filter(settings.sigma_angstrom)
    proj = imaging.project(atoms.deform(amp), rot, shift, atoms.weights, 32, 4.4, sigma)
    target = hemnma.Target(torch.fft.rfft2(proj) * filt, ones, 32, 4.4)
    wide = replace(settings, sigma_angstrom=float(np.hypot(settings.sigma_angstrom, spread)))
    ncc = lambda s: hemnma.model_ncc(target, pseudo, rot, shift, amp, s, 32)
    assert ncc(wide).min() > 0.998  # 0.9987; the misfit 1 - NCC less than half of without
    assert ((1 - ncc(wide)) < 0.5 * (1 - ncc(settings))).all()  # the spread (0.9963-0.9969)


def test_aligner_stages_on_pseudo_atoms_of_their_pixels(adk_model_files):
    """The aligner's coarse model: cubes of `coarse_cell` coarse-box pixels (here 0.7 × 4.4 Å
    for 64-px images of 2.2 Å at a 32-px coarse box; in local mode `local_coarse_cell`, 1.4 ×
    4.4 Å, unless the coarse box is the full box), its full-box model: cubes of `full_cell`
    full-box pixels (1.0 × 2.2 Å) but never coarser than `coarse_cell`'s, in both modes (32-px
    images of 4.4 Å, or a full cell of 2 pixels: 0.7 × 4.4 Å), each's spread added to the
    atoms' width; a cell of 0 keeps the atoms themselves."""
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    local = hemnma.AlignSettings(start="priors")
    al = hemnma.Aligner(model, 64, 2.2, local, torch.device("cpu"))
    rough, rough_spread = model.coarsened(1.4 * 4.4)
    np.testing.assert_allclose(al.coarse_model.coords.numpy(), rough.coords, atol=1e-4)
    assert np.isclose(al.coarse_spread, rough_spread)
    search_cube, search_spread = model.coarsened(0.7 * 4.4)
    small = hemnma.Aligner(model, 32, 4.4, local, torch.device("cpu"))
    for m in (small.coarse_model, small.full_model):
        np.testing.assert_allclose(m.coords.numpy(), search_cube.coords, atol=1e-4)
    assert np.isclose(small.coarse_spread, search_spread)
    wide = hemnma.Aligner(model, 64, 2.2, replace(local, full_cell=2.0), torch.device("cpu"))
    np.testing.assert_allclose(wide.full_model.coords.numpy(), search_cube.coords, atol=1e-4)
    atoms = hemnma.Aligner(
        model, 64, 2.2, replace(local, local_coarse_cell=0.0), torch.device("cpu")
    )
    assert atoms.coarse_model is atoms.model
    s = hemnma.AlignSettings(n_directions=20)  # search: a small gallery
    al = hemnma.Aligner(model, 64, 2.2, s, torch.device("cpu"))
    pseudo, spread = model.coarsened(0.7 * 4.4)
    np.testing.assert_allclose(al.coarse_model.coords.numpy(), pseudo.coords, atol=1e-4)
    assert np.isclose(al.at_coarse(s).sigma_angstrom, np.hypot(s.sigma_angstrom, spread))
    assert len(al.model.coords) == len(model.coords)
    fine, fine_spread = model.coarsened(1.0 * 2.2)
    assert len(pseudo.coords) < len(fine.coords) < len(model.coords)  # 845 < 1,204 < 1,656
    np.testing.assert_allclose(al.full_model.coords.numpy(), fine.coords, atol=1e-4)
    assert np.isclose(al.at_full(s).sigma_angstrom, np.hypot(s.sigma_angstrom, fine_spread))
    assert 0 < fine_spread < spread < rough_spread
    assert len(rough.coords) < len(pseudo.coords)  # 216 < 845
    small = hemnma.Aligner(model, 32, 4.4, s, torch.device("cpu"))
    np.testing.assert_allclose(small.full_model.coords.numpy(), pseudo.coords, atol=1e-4)
    assert np.isclose(small.full_spread, spread)
    none = replace(s, coarse_cell=0.0, full_cell=0.0)
    atoms = hemnma.Aligner(model, 64, 2.2, none, torch.device("cpu"))
    assert atoms.coarse_model is atoms.model and atoms.at_coarse(none) == none
    assert atoms.full_model is atoms.model and atoms.at_full(none) == none


def test_shard_rows():
    shards = shard_rows(100, 30, 4, seed=1)
    rows = np.concatenate(shards)
    assert len(rows) == 30 and len(np.unique(rows)) == 30 and np.all(np.diff(rows) > 0)
    assert [len(s) for s in shards] == [8, 8, 7, 7]
    np.testing.assert_array_equal(rows, np.concatenate(shard_rows(100, 30, 4, seed=1)))
    assert len(np.concatenate(shard_rows(10, None, 3, 0))) == 10
    with pytest.raises(InputError, match="a subset of 11 is more than the 10 particles"):
        shard_rows(10, 11, 2, 0)
    with pytest.raises(InputError, match="1 particles for 2 shards"):
        shard_rows(10, 1, 2, 0)


def test_shard_cli_refuses_empty_shards(tmp_path, capsys):
    star = tmp_path / "p.star"
    starfile.write({"particles": pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"]})}, star)
    outs = [str(tmp_path / f"shard_{i}.star") for i in range(3)]
    assert cli(["shard", "--particles", str(star), "--out", *outs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"deephemnma shard: error: {star}: 2 particles for 3 shards (some would be empty)"
    ]
    assert not any(os.path.exists(o) for o in outs)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec (pip mpich) not on PATH")
def test_mpi_two_ranks_equal_one_rank(adk_model_files, tmp_path):
    """The answers do not depend on the number of MPI ranks, the search retry included (its
    share is of all ranks' images together)."""
    simulate(tmp_path, adk_model_files, 6, 32, 4.4, True, seed=4)
    files = adk_model_files
    common = [
        "-m",
        "deephemnma",
        "hemnma",
        "--particles",
        "p.star",
        "--model",
        str(files / "model.npz"),
        "--modes",
        str(files / "modes.npz"),
        "--coarse-box",
        "16",
        "--n-directions",
        "100",
        "--iterations",
        "5",
        "10",
        "--batch",
        "2",
        "--retry",
        "0.34",  # 3 of the 6 images together (per rank: 2 of 3 on each)
        "--candidates",
        "1",
        "--retry-candidates",
        "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, *common, "--out", "two.star"],
        cwd=tmp_path,
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, *common, "--out", "one.star"],
        cwd=tmp_path,
        check=True,
        env=env,
        capture_output=True,
    )
    one = starfile.read(tmp_path / "one.star")["particles"]
    two = starfile.read(tmp_path / "two.star")["particles"]
    assert list(one["rlnImageName"]) == list(two["rlnImageName"])
    for col in [
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "dhAmplitudeMode7",
        "dhAmplitudeMode9",
        "dhCost",
    ]:
        np.testing.assert_allclose(two[col], one[col], atol=2e-3, err_msg=col)


@pytest.fixture(scope="module")
def two_states(adk_atoms, adk_modes):
    """Open and closed AK references (closed superposed on open) and a noise-free mixture of
    4 open + 4 closed particles (32 px, 4.4 Å/px, CTF): (references, images, ctf, table, state)."""
    from deephemnma import model as model_mod
    from deephemnma import nma as nma_mod
    from deephemnma import simulate

    from .conftest import CLOSED_PDB, sim_config

    refs = []
    for ag in (adk_atoms, model_mod.prepare_model(CLOSED_PDB, "heavy", None)):
        _, evals, modes = nma_mod.compute_modes(ag, 3, 15.0, 1.0, 5000)
        weights = model_mod.scattering_weights(ag.getElements())
        refs.append(
            FlexibleModel(
                ag.getCoords(), modes, weights, np.arange(7, 10), evals, model_mod.atom_labels(ag)
            )
        )
    refs[1] = hemnma.superpose(refs[1], refs[0])
    cfg = sim_config(box=32, pixel_size=4.4, max_shift_px=1.5, seed=5)
    table = simulate.draw_parameters(8, np.arange(7, 10), cfg)
    for k in (7, 8, 9):
        table[f"dhAmplitudeMode{k}"] = 0.0
    state = np.array([0, 1] * 4)
    images = np.zeros((8, 32, 32), dtype=np.float32)
    gen = torch.Generator().manual_seed(0)
    for s, ref in enumerate(refs):
        rows = np.flatnonzero(state == s)
        out = simulate.render(ref.to(), table.iloc[rows], cfg, gen)
        images[rows] = out["final"].numpy()
    n = len(table)
    ctf = {
        "defocus_u": table["rlnDefocusU"].to_numpy(),
        "defocus_v": table["rlnDefocusV"].to_numpy(),
        "defocus_angle": np.zeros(n),
        "phase_shift": np.zeros(n),
        "voltage_kv": np.full(n, cfg.voltage_kv),
        "cs_mm": np.full(n, cfg.cs_mm),
        "amplitude_contrast": np.full(n, cfg.amplitude_contrast),
        "bfactor": np.zeros(n),
    }
    return refs, images, ctf, table, state


def small_settings(**kw) -> hemnma.AlignSettings:
    return hemnma.AlignSettings(iterations=(20, 40), **kw)


def test_superpose_recovers_a_rigid_motion(two_states):
    refs = two_states[0]
    rot = geometry.euler_to_matrix(np.array([30.0, 50.0, -20.0]))
    moved = replace(refs[1], coords=refs[1].coords @ rot + 5.0, modes=refs[1].modes @ rot)
    back = hemnma.superpose(moved, refs[0])
    np.testing.assert_allclose(back.coords, refs[1].coords, atol=1e-6)
    np.testing.assert_allclose(back.modes, refs[1].modes, atol=1e-9)


def test_several_references_each_image_keeps_its_own(two_states):
    """Each image keeps its state's reference, and the mixture separates on PC1 of the space.
    (Against the open model alone it does not, even without noise: 3 of the 4 closed particles
    get poses 76-112 degrees off and amplitudes anywhere along the modes.)"""
    refs, images, ctf, table, state = two_states
    cpu, s = torch.device("cpu"), small_settings()
    aligners = [hemnma.Aligner(r, 32, 4.4, s, cpu) for r in refs]
    res = hemnma.align_best(aligners, images, ctf, np.arange(8), True)
    truth = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    ang = geometry.euler_distance_deg(res["euler"], truth)
    print(f"references {res['reference']}, pose error {ang.round(2)}")
    np.testing.assert_array_equal(res["reference"], state)
    assert ang.max() < 3.0
    # on the first reference's modes, closed particles sit at their least-squares fit
    amps = hemnma.common_amplitudes(refs, res["reference"], res["amplitudes"])
    lsq = hemnma.common_amplitudes(refs, np.array([1]), np.zeros((1, 3)))[0]
    assert np.abs(lsq - [-212, 111, -35]).max() < 5  # 1AKE on 4AKE modes 7-9
    np.testing.assert_allclose(amps[state == 1], np.tile(lsq, (4, 1)), atol=30)
    assert np.abs(amps[state == 0]).max() < 30
    assert separated_on_pc1(amps, state)


def separated_on_pc1(amps: np.ndarray, state: np.ndarray) -> bool:
    """Whether PC1 of the space (PCA of the amplitudes) puts the two states on either side."""
    from deephemnma.space import PCA

    pc1 = PCA.fit(amps).transform(amps)[:, 0]
    print(f"PC1 open {pc1[state == 0].round(1)}, closed {pc1[state == 1].round(1)}")
    a, b = pc1[state == 0], pc1[state == 1]
    return bool(a.max() < b.min() or b.max() < a.min())


def test_quality_flag_marks_a_structure_the_model_does_not_explain(two_states):
    from deephemnma.gather import cost_z

    refs, images, ctf, _, state = two_states
    keep = np.array([0, 1, 2, 4, 6])  # four open, one closed
    al = hemnma.Aligner(refs[0], 32, 4.4, small_settings(), torch.device("cpu"))
    res = hemnma.align_best([al], images[keep], ctf, keep, True)
    z = cost_z(pd.DataFrame({"dhCost": res["cost"]}))
    print(f"costs {res['cost'].round(4)}, z {z.round(1)}")
    np.testing.assert_array_equal(z > 3.0, state[keep] == 1)
    # per reference: the same costs under two references are scored separately
    two = pd.DataFrame(
        {"dhCost": np.r_[res["cost"], res["cost"] + 1], "dhReference": [1] * 5 + [2] * 5}
    )
    np.testing.assert_allclose(cost_z(two), np.r_[z, z])


def test_quality_flag_when_half_the_population_is_unexplained():
    """Two separated cost groups: the lower sets the baseline, so the upper half is flagged
    (the median and MAD of all would call it typical); one skewed group is not split."""
    from deephemnma.gather import cost_z, robust_z

    rng = np.random.default_rng(0)
    state = np.repeat([0, 1], 100)
    cost = np.where(state == 0, rng.normal(0.62, 0.012, 200), rng.normal(0.69, 0.015, 200))
    z = cost_z(pd.DataFrame({"dhCost": cost}))
    assert (z[state == 1] > 3).mean() > 0.95 and (z[state == 0] > 3).mean() < 0.02
    assert (robust_z(cost)[state == 1] > 3).mean() < 0.1  # what the plain robust z-score does
    np.testing.assert_allclose(z[:100], robust_z(cost[:100]), atol=0.3)
    skewed = 0.5 + rng.gamma(2.0, 0.02, 400)
    np.testing.assert_array_equal(cost_z(pd.DataFrame({"dhCost": skewed})), robust_z(skewed))
    even = np.linspace(0.6, 0.7, 200)  # Ashman's D 3.05, but no valley between the components
    np.testing.assert_array_equal(cost_z(pd.DataFrame({"dhCost": even})), robust_z(even))
    # closer groups, as HEMNMA's costs of imported open (deformed) and closed AK particles against
    # the open model (bench/mixture.py: medians 0.615 and 0.690, Ashman's D 3.7)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        cost = np.where(state == 0, rng.normal(0.615, 0.0185, 200), rng.normal(0.69, 0.022, 200))
        z = cost_z(pd.DataFrame({"dhCost": cost}))
        assert (z[state == 1] > 3).mean() >= 0.7 and (z[state == 0] > 3).mean() < 0.03


def test_amplitude_prior_pulls_noise_to_zero_and_leaves_data_alone(two_states):
    refs, images, ctf, table, _ = two_states
    ref, s = refs[0], small_settings(amplitude_prior=60.0)
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    sd = t(hemnma.prior_std(ref.eigenvalues, s.amplitude_prior))
    rot = geometry.euler_to_matrix(
        t(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[:1])
    )
    shift = -t(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[:1]) / 4.4
    noise = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    truth = np.array([[90.0, -70.0, 40.0]])
    from deephemnma import simulate

    from .conftest import sim_config

    cfg = sim_config(box=32, pixel_size=4.4, snr=None)
    row = table.iloc[:1].copy()
    row[["dhAmplitudeMode7", "dhAmplitudeMode8", "dhAmplitudeMode9"]] = truth
    clean = simulate.render(ref.to(), row, cfg, torch.Generator())["final"].numpy()

    def fit(img, prior, amp0):
        target = hemnma.make_target(t(img), ctf, np.arange(1), 32, 4.4, True)
        out = hemnma.refine(target, ref.to(), rot, shift, t(amp0), 60, s, 32, prior)
        return out[2].numpy()[0]

    start = np.full((1, 3), 100.0)
    free, held = fit(noise, None, start), fit(noise, sd, start)
    print(f"pure noise: free {free.round(1)}, with prior {held.round(1)}")
    assert np.abs(held).max() < 25.0 and np.linalg.norm(held) < 0.5 * np.linalg.norm(free)
    on_data = fit(clean, sd, np.zeros((1, 3)))
    print(f"clean data with prior: {on_data.round(1)} (truth {truth[0]})")
    np.testing.assert_allclose(on_data, truth[0], atol=8.0)


def test_cli_several_references(adk_model_files, tmp_path):
    from .conftest import CLOSED_PDB

    simulate(tmp_path, adk_model_files, 4, 32, 4.4, True, seed=6)
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "deephemnma", *map(str, a)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert (
        run(
            "prepare-model", "--structure", CLOSED_PDB, "--out-npz", "c.npz", "--out-pdb", "c.pdb"
        ).returncode
        == 0
    )
    nma = ["--out-nmd", "c.nmd", "--out-table", "c.csv", "--out-anim-dir", "anim"]
    assert (
        run("nma", "--model", "c.npz", "--pdb", "c.pdb", "--out-npz", "cm.npz", *nma).returncode
        == 0
    )
    files = adk_model_files
    fast = ["--coarse-box", "16", "--n-directions", "50", "--iterations", "3", "5"]

    def hemnma(modes: list, out: str) -> subprocess.CompletedProcess:
        models = ["--model", files / "model.npz", "c.npz"]
        return run(
            "hemnma", "--particles", "p.star", *models, "--modes", *modes, "--out", out, *fast
        )

    r = hemnma([files / "modes.npz", "cm.npz"], "two.star")
    assert r.returncode == 0, r.stderr[-2000:]
    out = starfile.read(tmp_path / "two.star")["particles"]
    assert set(out["dhReference"]) <= {1, 2} and "dhRefAmplitudeMode9" in out
    r = hemnma(["cm.npz"], "x.star")
    assert r.returncode == 2 and "2 model files but 1 modes files" in r.stderr


def test_fitted_references_are_measured_against_the_first():
    """Images a reference fitted by a reference update takes with uniformly poor costs are typical
    among themselves, but not against the model's own images: with `originals` they are flagged."""
    from deephemnma.gather import cost_z

    rng = np.random.default_rng(0)
    own, fitted = rng.normal(0.62, 0.01, 200), rng.normal(0.69, 0.01, 60)
    parts = pd.DataFrame({"dhCost": np.r_[own, fitted], "dhReference": [1] * 200 + [2] * 60})
    alone = cost_z(parts)
    assert (alone[200:] > 3).mean() < 0.05
    z = cost_z(parts, originals=1)
    assert (z[200:] > 3).all() and (z[:200] > 3).mean() < 0.02
    np.testing.assert_allclose(cost_z(parts, originals=2), alone)  # both given by the user
    np.testing.assert_allclose(cost_z(parts.iloc[200:], parts, originals=1), z[200:])
