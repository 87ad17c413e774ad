"""Local HEMNMA refinement from a given pose (priors, networks) and the hybrid select/combine steps."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma import geometry, hemnma, hybrid, relion
from deephemnma.cli import main as cli
from deephemnma.files import InputError
from deephemnma.flexible import FlexibleModel
from deephemnma.gather import cost_z
from deephemnma.io import ParticleSet, optics_table, write_star
from deephemnma.mrc import write_mrc

from .test_hemnma import simulate


def perturb(euler: np.ndarray, deg: float, seed: int) -> np.ndarray:
    """Each orientation rotated by `deg` about a random axis."""
    axis = np.random.default_rng(seed).standard_normal((len(euler), 3))
    axis *= np.radians(deg) / np.linalg.norm(axis, axis=1, keepdims=True)
    delta = torch.linalg.matrix_exp(hemnma.skew(torch.tensor(axis))).numpy()
    return geometry.matrix_to_euler(delta @ geometry.euler_to_matrix(euler))


@pytest.fixture(scope="module")
def noise_free(adk_model_files, tmp_path_factory):
    """8 noise-free CTF particles (32 px, 4.4 Å/px) and an aligner factory."""
    d = tmp_path_factory.mktemp("local")
    star = simulate(d, adk_model_files, 8, 32, 4.4, True, seed=3)
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")

    def aligner(ps, **kw):
        s = hemnma.AlignSettings(start="priors", **kw)
        cpu = torch.device("cpu")
        return hemnma.Aligner(model, ps.box, ps.pixel_size, s, cpu)

    return d, star, aligner


def test_local_refinement_converges_back_from_a_perturbed_pose(noise_free, monkeypatch):
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    start = hemnma.Start(
        perturb(ps.euler(), 4.0, seed=0),
        ps.shifts_px() + [0.7, -0.7],
        np.zeros((len(ps), 3)),  # a rigid consensus knows no amplitudes
    )
    al = aligner(ps)
    assert al.gallery is None  # no global search
    res = hemnma.align_rows(ps, np.arange(len(ps)), al, start=start)
    ang = geometry.euler_distance_deg(res["euler"], ps.euler())
    amp = np.abs(res["amplitudes"] - ps.amplitudes([7, 8, 9]))
    shift = np.linalg.norm(res["shifts_px"] - ps.shifts_px(), axis=1)
    print(f"from 4°: angle {ang.round(2)}, |amp err| {amp.mean():.1f}, shift {shift.mean():.3f} px")
    assert ang.mean() < 0.6 and ang.max() < 1.5  # as the global search's noise-free test
    assert amp.mean() < 6.0 and shift.max() < 0.2  # amplitudes span ±150


def test_local_refinement_stays_within_its_bounds(noise_free, monkeypatch):
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(4)
    start = hemnma.Start(
        perturb(ps.euler(rows), 6.0, seed=1),
        ps.shifts_px(rows) + 1.5,
        ps.amplitudes([7, 8, 9], rows),
    )
    al = aligner(ps, local_max_angle_deg=2.0, local_max_shift_px=0.5)
    res = hemnma.align_rows(ps, rows, al, start=start)
    moved = geometry.euler_distance_deg(res["euler"], start.euler)
    shifted = np.linalg.norm(res["shifts_px"] - start.shifts_px, axis=1)
    assert moved.max() < 2.0 + 1e-3 and shifted.max() < 0.5 + 1e-4
    assert moved.min() > 1.9  # the truth is 6° away: every image ends on the bound
    # the flip candidate: a start turned by 180° in plane is recovered
    flipped = hemnma.Start(start.euler + [0, 0, 180.0], ps.shifts_px(rows), start.amplitudes)
    al = aligner(ps, local_max_angle_deg=10.0, local_flip=True)
    res = hemnma.align_rows(ps, rows, al, start=flipped)
    assert geometry.euler_distance_deg(res["euler"], ps.euler(rows)).max() < 7.0


def test_orientation_candidates_rescue_a_start_beyond_the_bound(noise_free, monkeypatch):
    """A start 90° off stays wrong (the rotation is bound to 25° around it); with the truth's
    neighbourhood among its candidates (an angle network's next best), the best candidate wins."""
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(4)
    far = perturb(ps.euler(rows), 90.0, seed=2)
    zero = np.zeros((len(rows), 3))
    al = aligner(ps)
    alone = hemnma.align_rows(ps, rows, al, start=hemnma.Start(far, ps.shifts_px(rows), zero))
    assert geometry.euler_distance_deg(alone["euler"], ps.euler(rows)).min() > 60.0
    # candidates: another wrong orientation, then one 8° off (a grid point near the truth)
    others = np.stack([perturb(ps.euler(rows), 120.0, seed=4), perturb(ps.euler(rows), 8.0, 5)], 1)
    start = hemnma.Start(far, ps.shifts_px(rows), zero, others)
    res = hemnma.align_rows(ps, rows, al, start=start)
    ang = geometry.euler_distance_deg(res["euler"], ps.euler(rows))
    print(f"from 90° with candidates: {ang.round(2)}")
    assert ang.mean() < 0.6 and ang.max() < 1.5  # as from 4° alone


def test_every_reference_starts_from_the_orientation_candidates(noise_free, monkeypatch):
    """With several references, the others start undeformed but from the same orientations as
    the first: the answer and every candidate."""
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(2)
    others = np.stack([perturb(ps.euler(rows), 120.0, 4), perturb(ps.euler(rows), 8.0, 5)], 1)
    start = hemnma.Start(ps.euler(rows), ps.shifts_px(rows), ps.amplitudes([7, 8, 9], rows), others)
    seen = []
    al = aligner(ps, local_iterations=(1, 1))
    monkeypatch.setattr(
        al, "align", lambda *a, **k: seen.append(a[-1]) or hemnma.Aligner.align(al, *a, **k)
    )
    hemnma.align_best([al, al], ps.images[rows], ps.ctf_params(), rows, ps.has_ctf, start)
    assert [s.candidates is others for s in seen] == [True, True]
    assert (seen[1].amplitudes == 0).all()


def test_amplitude_starts_are_the_best_correlating_gallery_models(noise_free, monkeypatch):
    """At each image's true pose, the n starts are distinct members of {own, own ± g along each
    mode}, in falling correlation, the first the best of all seven."""
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(len(ps))
    al = aligner(ps)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)
    target = hemnma.make_target(
        f32(ps.images[rows]), ps.ctf_params(), rows, 32, ps.pixel_size, True
    )
    rot, shift = geometry.euler_to_matrix(f32(ps.euler())), f32(ps.shifts_px())
    own = f32(np.full((len(ps), 3), 20.0))
    starts = al.start_amplitudes(target, rot, shift, own, 3)  # (8, 3, 3)
    allowed = own[:, None] + torch.cat([torch.zeros(1, 3), 100 * torch.eye(3), -100 * torch.eye(3)])
    ncc = lambda a: hemnma.model_ncc(target, al.model, rot, shift, a, al.s, ps.box)
    every = torch.stack([ncc(allowed[:, m]) for m in range(7)], 1)  # (8, 7)
    c = torch.stack([ncc(starts[:, j]) for j in range(3)], 1)
    assert ((starts[:, :, None] == allowed[:, None]).all(-1).sum(-1) == 1).all()  # members
    assert (starts[:, 0] != starts[:, 1]).any(-1).all() and (starts[:, 1] != starts[:, 2]).any(
        -1
    ).all()
    assert (c[:, :-1] >= c[:, 1:]).all()
    torch.testing.assert_close(c[:, 0], every.max(1).values)
    # the best start moves along a mode toward the truth (these particles lie up to 150 out)
    step = starts[:, 0].numpy() - 20.0
    moved = np.abs(step).max(1) > 0
    truth = ps.amplitudes([7, 8, 9])
    assert moved.sum() >= 6
    assert (np.sign(step) == np.sign(truth))[np.abs(step) > 0].all()


def test_pruning_goes_on_with_each_orientations_best_start(noise_free, monkeypatch):
    """Three starts per orientation refined for `local_prune_after` coarse iterations, then only
    the one with the lowest objective for the rest, anchored at the start's rotation with the ω
    it reached; thorough (the retry), all 2K + 1 starts go the whole way, with one start that one."""
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(2)
    calls = []

    def recorded(target, model, rot0, shift0, amp0, iterations, *a, **k):
        out = real(target, model, rot0, shift0, amp0, iterations, *a, **k)
        omega0 = a[3] if len(a) > 3 else k.get("omega0")
        calls.append((len(rot0), iterations, rot0, amp0, omega0, out))
        return out

    real = hemnma.refine
    monkeypatch.setattr(hemnma, "refine", recorded)
    start = hemnma.Start(perturb(ps.euler(rows), 4.0, 0), ps.shifts_px(rows), np.zeros((2, 3)))
    al = aligner(ps, local_starts=3, local_prune_after=6, local_iterations=(10, 5))
    al.align(ps.images[rows], ps.ctf_params(), rows, True, start)
    assert [c[:2] for c in calls] == [(6, 6), (2, 4), (2, 5)]
    first = calls[0][5]  # rot, shift, amp, ncc, objective, ω
    best = first[4].view(2, 3).argmin(1) + torch.tensor([0, 3])
    torch.testing.assert_close(calls[1][3], first[2][best])  # the best start goes on ...
    torch.testing.assert_close(calls[1][4], first[5][best])  # ... from the ω it reached
    torch.testing.assert_close(calls[1][2], calls[0][2][::3])  # about the start's rotation
    calls.clear()
    al.align(ps.images[rows], ps.ctf_params(), rows, True, start, thorough=True)
    assert [c[:2] for c in calls] == [(14, 10), (2, 5)]
    calls.clear()
    aligner(ps, local_starts=1).align(ps.images[rows], ps.ctf_params(), rows, True, start)
    assert [c[:2] for c in calls] == [(2, 25), (2, 25)]


def test_retry_redoes_the_highest_cost_images_without_pruning(noise_free, monkeypatch):
    """Two starts 90° off leave their images unexplained: with local_retry 0.5 exactly those two
    are refined again from every amplitude start, unpruned; each keeps the lower objective of the
    two runs, the others are untouched. Without the gallery's starts there is nothing to retry."""
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(4)
    euler = ps.euler()
    euler[2:4] = perturb(euler[2:4], 90.0, seed=2)
    start = hemnma.Start(euler, ps.shifts_px(), np.zeros((len(ps), 3)))
    seen = []
    real = hemnma.Aligner.align

    def recorded(self, images, ctf, r, has_ctf, st, thorough=False):
        seen.append((sorted(r), thorough))
        return real(self, images, ctf, r, has_ctf, st, thorough=thorough)

    monkeypatch.setattr(hemnma.Aligner, "align", recorded)
    kw = dict(local_iterations=(10, 4), local_prune_after=1)
    pruned = hemnma.align_rows(ps, rows, aligner(ps, **kw, local_retry=0.0), start=start)
    no_pruning = aligner(ps, **{**kw, "local_prune_after": 10, "local_starts": 7})
    unpruned = hemnma.align_rows(ps, rows[2:], no_pruning, start=start)
    seen.clear()
    res = hemnma.align_rows(ps, rows, aligner(ps, **kw, local_retry=0.5), start=start)
    assert seen == [([0, 1, 2, 3], False), ([2, 3], True)]
    assert (pruned["cost"][2:] > pruned["cost"][:2].max()).all()
    better = unpruned["objective"] < pruned["objective"][2:]
    assert better.any() and not better.all()  # both outcomes of the retry are checked
    for key in ("euler", "amplitudes", "objective"):
        np.testing.assert_array_equal(res[key][:2], pruned[key][:2])
        for i in (2, 3):
            lower = unpruned if unpruned["objective"][i - 2] < pruned["objective"][i] else pruned
            np.testing.assert_array_equal(
                res[key][i], lower[key][i - 2 if lower is unpruned else i]
            )
    seen.clear()
    hemnma.align_rows(
        ps, rows, aligner(ps, **kw, gallery_amplitude=0, local_retry=0.5), start=start
    )
    assert seen == [([0, 1, 2, 3], False)]
    seen.clear()  # one start: the retry still tries 3
    hemnma.align_rows(ps, rows, aligner(ps, **kw, local_starts=1, local_retry=0.5), start=start)
    assert seen == [([0, 1, 2, 3], False), ([2, 3], True)]


def test_local_retry_starts():
    """The retry's amplitude starts: 3 × `local_starts` of the 2K + 1, 1 without gallery models;
    it runs only where it differs from the first pass (more starts, or unpruned)."""
    s = hemnma.AlignSettings(start="priors")
    assert [s.local_retry_starts(k) for k in (1, 3, 10)] == [3, 7, 9]
    assert replace(s, gallery_amplitude=0).local_retry_starts(3) == 1
    assert s.local_retry_helps(3) and replace(s, local_starts=1).local_retry_helps(3)
    assert not replace(s, gallery_amplitude=0).local_retry_helps(3)
    every = replace(s, local_starts=7, local_iterations=(5, 25))  # all 7, never pruned
    assert not every.local_pruned and not every.local_retry_helps(3)
    assert every.local_retry_helps(10)  # 21 starts: the first pass takes 7, the retry all 21


def test_escalation_sends_the_worst_explained_images_to_the_global_search(noise_free, monkeypatch):
    """Starts 90° off leave every image unexplained (high cost); escalating half of them aligns
    exactly those two again from the global search, which finds their orientation."""
    d, star, aligner = noise_free
    monkeypatch.chdir(d)
    ps = ParticleSet(star)
    rows = np.arange(4)
    start = hemnma.Start(perturb(ps.euler(), 90.0, seed=2), ps.shifts_px(), np.zeros((len(ps), 3)))
    al = aligner(ps)
    local = hemnma.align_rows(ps, rows, al, start=start)
    res = hemnma.escalate(ps, rows, [al.model], al.s, torch.device("cpu"), local, 0.5)
    ang = geometry.euler_distance_deg(res["euler"], ps.euler(rows))
    worst = np.argsort(local["cost"])[2:]
    print(f"escalated {worst}: {ang.round(2)}")
    assert ang[worst].max() < 1.5 and np.delete(ang, worst).min() > 60.0
    assert (res["cost"][worst] < local["cost"][worst]).all()


def relion_star(path, version: str, pose: bool = True) -> pd.DataFrame:
    """A 2-particle RELION STAR (3.0: one block, pixels; 3.1: optics + Å) with a consensus pose."""
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnDefocusU": 5000.0})
    if pose:
        df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = (
            [10.0, 20.0],
            [30.0, 40.0],
            [50.0, 60.0],
        )
    optics = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
    if version == "3.0":
        df = df.assign(rlnDetectorPixelSize=5.0, rlnMagnification=10000.0, **optics)
        if pose:
            df["rlnOriginX"], df["rlnOriginY"] = [1.0, -2.0], [0.5, 0.0]
        starfile.write(df, path, overwrite=True)
    else:
        if pose:
            df["rlnOriginXAngst"], df["rlnOriginYAngst"] = [5.0, -10.0], [2.5, 0.0]
        df["rlnOpticsGroup"] = 1
        opt = pd.DataFrame(
            {
                "rlnOpticsGroup": [1],
                "rlnImagePixelSize": [5.0],
                **{k: [v] for k, v in optics.items()},
            }
        )
        starfile.write({"optics": opt, "particles": df}, path, overwrite=True)
    return df


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_priors_start_reads_the_imported_consensus_pose(tmp_path, monkeypatch, version):
    monkeypatch.chdir(tmp_path)
    write_mrc(tmp_path / "a.mrcs", np.zeros((2, 16, 16)), 5.0)
    relion_star(tmp_path / "in.star", version)
    relion.import_particles(
        tmp_path / "in.star", None, None, False, tmp_path / "o.star", tmp_path / "o", 100
    )
    start = hemnma.read_start(ParticleSet(tmp_path / "o.star"), "priors", [7, 8, 9])
    np.testing.assert_allclose(start.euler, [[10, 30, 50], [20, 40, 60]])
    np.testing.assert_allclose(start.shifts_px, [[-1.0, -0.5], [2.0, 0.0]])  # origin = -shift
    np.testing.assert_array_equal(start.amplitudes, np.zeros((2, 3)))


def test_priors_start_without_a_consensus_pose_is_a_one_line_error(
    tmp_path, monkeypatch, capsys, adk_model_files
):
    monkeypatch.chdir(tmp_path)
    write_mrc(tmp_path / "a.mrcs", np.zeros((2, 16, 16)), 5.0)
    relion_star(tmp_path / "in.star", "3.1", pose=False)
    relion.import_particles(
        tmp_path / "in.star", None, None, False, tmp_path / "o.star", tmp_path / "o", 100
    )
    files = [adk_model_files / "model.npz", "--modes", adk_model_files / "modes.npz"]
    argv = ["hemnma", "--particles", "o.star", "--model", *map(str, files), "--out", "x.star"]
    capsys.readouterr()
    assert cli([*argv, "--start", "priors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "deephemnma hemnma: error: o.star: --start priors needs column(s) _rlnAngleRotPrior, "
        "_rlnAngleTiltPrior, _rlnAnglePsiPrior, _rlnOriginXPriorAngst, _rlnOriginYPriorAngst"
    ]
    assert cli([*argv, "--escalate", "0.2"]) == 2  # a global search has nothing to escalate
    assert "--escalate 0.2: a fraction in [0, 1], local mode only" in capsys.readouterr().err
    assert cli([*argv, "--local-retry", "1.5"]) == 2
    assert "--local-retry 1.5: a fraction in [0, 1]" in capsys.readouterr().err
    assert cli([*argv, "--retry", "-0.1"]) == 2
    assert "--retry -0.1: a fraction in [0, 1]" in capsys.readouterr().err
    assert cli([*argv, "--coarse-cell", "-1"]) == 2
    assert "--coarse-cell -1: at least 0 (0: the atoms)" in capsys.readouterr().err
    assert cli([*argv, "--full-cell", "nan"]) == 2
    assert "--full-cell nan: at least 0 (0: the atoms)" in capsys.readouterr().err
    assert cli([*argv, "--local-coarse-cell", "-0.5"]) == 2
    assert "--local-coarse-cell -0.5: at least 0 (0: the atoms)" in capsys.readouterr().err
    assert cli([*argv, "--local-starts", "0"]) == 2
    assert "--local-starts 0, --local-prune-after 6: each at least 1" in capsys.readouterr().err
    with pytest.raises(
        InputError, match=r"o\.star: --start network needs column\(s\) _rlnAngleRot,"
    ):
        hemnma.read_start(ParticleSet("o.star"), "network", [7])
    assert not (tmp_path / "x.star").exists()


def merged_table() -> pd.DataFrame:
    """A merged STAR's particle table: 6 images, the first two labelled by HEMNMA."""
    t = pd.DataFrame({"rlnImageName": [f"{i}@s.mrcs" for i in range(1, 7)]})
    for c in (
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "dhAmplitudeMode7",
    ):
        t[c] = 0.0
    t["dhHemnmaLabelled"] = [1, 1, 0, 0, 0, 0]
    for p in hybrid.PARAMS:
        t[f"dhSource{p.capitalize()}"] = ["hemnma"] * 2 + ["network"] * 4
    return t


def test_select_all_or_the_most_uncertain_images():
    t = merged_table()
    np.testing.assert_array_equal(hybrid.select_rows(t, "all", 0.5, "m.star"), [2, 3, 4, 5])
    with pytest.raises(
        InputError, match=r"m\.star: --select uncertain needs column\(s\) _dhUncertaintyAngles"
    ):
        hybrid.select_rows(t, "uncertain", 0.5, "m.star")
    t["dhUncertaintyAngles"] = [9, 9, 1, 4, 2, 3]  # labelled rows never chosen
    t["dhUncertaintyShifts"] = [9, 9, 0.1, 0.2, 0.9, 0.3]
    np.testing.assert_array_equal(hybrid.select_rows(t, "uncertain", 0.5, "m.star"), [3, 4])
    # the agreement with the model alone, or next to them: low agreement = uncertain
    alone = t.drop(columns=["dhUncertaintyAngles", "dhUncertaintyShifts"])
    alone["dhModelAgreement"] = [0.0, 0.0, 0.9, 0.8, 0.2, 0.7]
    np.testing.assert_array_equal(hybrid.select_rows(alone, "uncertain", 0.5, "m.star"), [4, 5])
    # a large shift drift (a short refinement moves the shift far) = uncertain
    drift = alone.assign(dhModelShiftDrift=[0.0, 0.0, 3.0, 0.1, 0.2, 0.1])
    np.testing.assert_array_equal(hybrid.select_rows(drift, "uncertain", 0.5, "m.star"), [2, 4])
    t["dhModelAgreement"] = [0.0, 0.0, 0.1, 0.8, 0.7, 0.9]
    np.testing.assert_array_equal(hybrid.select_rows(t, "uncertain", 0.75, "m.star"), [2, 3, 4])
    # every image labelled by HEMNMA: nothing to refine, no error
    done = t.assign(dhHemnmaLabelled=1)
    assert len(hybrid.select_rows(done, "uncertain", 0.5, "m.star")) == 0
    with pytest.raises(InputError, match="missing _dhSourceShifts"):
        hybrid.select_rows(t.drop(columns="dhSourceShifts"), "all", 1, "m.star")


def test_combine_replaces_refined_values_and_marks_them():
    t = merged_table()
    refined = t.iloc[[4, 2]].copy()
    refined["rlnAngleTilt"], refined["dhAmplitudeMode7"], refined["dhCost"] = (
        [40.0, 20.0],
        [5.0, 7.0],
        0.1,
    )
    out = hybrid.combine(t, refined, "r.star")
    np.testing.assert_array_equal(out["rlnAngleTilt"], [0, 0, 20, 0, 40, 0])
    np.testing.assert_array_equal(out["dhAmplitudeMode7"], [0, 0, 7, 0, 5, 0])
    assert list(out["dhSourceAngles"]) == ["hemnma"] * 2 + [
        "hybrid",
        "network",
        "hybrid",
        "network",
    ]
    assert len(out) == len(t) and "dhCost" not in out
    refined["rlnImageName"] = ["9@s.mrcs", "3@s.mrcs"]
    with pytest.raises(InputError, match=r"r\.star: image 9@s\.mrcs is not in the merged STAR"):
        hybrid.combine(t, refined, "r.star")


def test_refined_images_are_trusted_when_their_cost_is_typical_of_hemnma(tmp_path):
    """An image the refinement explains as well as HEMNMA explains its own is trusted, even
    from an untrusted network's start; one left with an outlying cost is not."""
    optics = optics_table(2.2, 64, 200.0, 2.0, 0.1)
    t = merged_table()
    t["dhTrusted"] = [1, 1, 0, 0, 0, 0]  # an untrusted network answered images 3-6
    t["dhFlagged"] = [0, 0, 1, 0, 0, 0]  # merge flagged image 3's answer
    write_star(tmp_path / "m.star", optics, t)
    refined = t.iloc[[2, 3]].assign(dhCost=[0.62, 0.75])  # typical, far above HEMNMA's
    write_star(tmp_path / "r.star", optics, refined)
    cost = np.random.default_rng(0).normal(0.62, 0.01, 200)  # HEMNMA's own images
    hem = pd.DataFrame({"rlnImageName": [f"h{i}@s.mrcs" for i in range(200)], "dhCost": cost})
    write_star(tmp_path / "h.star", optics, hem)
    base = ["hybrid", "combine", "--merged", str(tmp_path / "m.star")]
    base += ["--refined", str(tmp_path / "r.star"), "--out", str(tmp_path / "o.star")]
    md = tmp_path / "v.md"
    assert cli([*base, "--hemnma", str(tmp_path / "h.star"), "--out-md", str(md)]) == 0
    out = starfile.read(tmp_path / "o.star")["particles"]
    assert out["dhTrusted"].tolist() == [1, 1, 1, 0, 0, 0]
    assert out["dhFlagged"].tolist() == [0, 0, 0, 1, 0, 0]  # the refined values are judged
    text = md.read_text(encoding="utf-8")
    assert "2 of 6 images refined" in text and "1 of them are explained" in text
    assert cli(base) == 0  # without HEMNMA's costs the merge's verdict stays
    assert starfile.read(tmp_path / "o.star")["particles"]["dhTrusted"].tolist() == [
        1,
        1,
        0,
        0,
        0,
        0,
    ]
    np.testing.assert_array_equal(
        cost_z(pd.DataFrame({"dhCost": [0.62, 0.64, 0.75]}), pd.DataFrame({"dhCost": cost})) <= 3.0,
        [True, True, False],
    )


def test_refined_trust_compares_each_reference_with_its_own_images(tmp_path):
    """With several references HEMNMA's costs differ by reference (gather flags per reference):
    a refined image on reference 2 is judged against HEMNMA's images on reference 2, one on a
    reference HEMNMA gave fewer than MIN_GROUP images against all of HEMNMA's."""
    rng = np.random.default_rng(1)
    hem_cost = np.concatenate([rng.normal(0.60, 0.01, 200), rng.normal(0.70, 0.01, 200)])
    hem_ref = np.repeat([1, 2], 200)
    cost, ref = np.array([0.70, 0.70, 0.60, 0.61]), np.array([2, 1, 1, 3])
    refined = pd.DataFrame({"dhCost": cost, "dhReference": ref})
    trusted = cost_z(refined, pd.DataFrame({"dhCost": hem_cost, "dhReference": hem_ref})) <= 3.0
    np.testing.assert_array_equal(trusted, [True, False, True, True])
    optics = optics_table(2.2, 64, 200.0, 2.0, 0.1)
    t = merged_table().assign(dhTrusted=0)
    write_star(tmp_path / "m.star", optics, t)
    write_star(tmp_path / "r.star", optics, t.iloc[[2, 3]].assign(dhCost=0.70, dhReference=[2, 1]))
    names = [f"h{i}@s.mrcs" for i in range(400)]
    hem = pd.DataFrame({"rlnImageName": names, "dhCost": hem_cost, "dhReference": hem_ref})
    write_star(tmp_path / "h.star", optics, hem)
    args = ["hybrid", "combine", "--merged", str(tmp_path / "m.star"), "--refined"]
    args += [str(tmp_path / "r.star"), "--hemnma", str(tmp_path / "h.star")]
    assert cli([*args, "--out", str(tmp_path / "o.star")]) == 0
    out = starfile.read(tmp_path / "o.star")["particles"]
    assert out["dhTrusted"].tolist() == [0, 0, 1, 0, 0, 0]


def test_select_and_combine_refuse_a_bad_fraction_and_overlapping_shards(tmp_path, capsys):
    optics = optics_table(2.2, 64, 200.0, 2.0, 0.1)
    t = merged_table()
    write_star(tmp_path / "m.star", optics, t)
    write_star(tmp_path / "r.star", optics, t.iloc[[2, 3]])
    runs = [
        (["select", "--fraction", "2", "--out", str(tmp_path / "s.star")], "--fraction 2: must be"),
        (
            ["combine", "--refined", str(tmp_path / "r.star"), str(tmp_path / "r.star")]
            + ["--out", str(tmp_path / "h.star")],
            "image 3@s.mrcs is in two refined shards",
        ),
    ]
    for argv, message in runs:
        rc = cli(["hybrid", argv[0], "--merged", str(tmp_path / "m.star"), *argv[1:]])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s.star").exists() and not (tmp_path / "h.star").exists()


def test_an_incomplete_orientation_candidate_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A candidate lacking one of its three angles (a hand-edited STAR) is refused, naming the
    file and the column, by the hybrid's start and by merge (not skipped, not a KeyError); a
    missing value (NaN) is refused on reading like any other."""
    monkeypatch.chdir(tmp_path)
    optics = optics_table(2.2, 64, 200.0, 2.0, 0.1)
    t = merged_table().drop(columns=["dhHemnmaLabelled"])
    t["rlnOpticsGroup"], t["rlnDefocusU"], t["rlnDefocusV"] = 1, 5000.0, 5000.0
    for c in ("Rot", "Tilt", "Psi"):
        t[f"dhAngleCandidate2{c}"] = 10.0
    t["dhAngleCandidate3Rot"], t["dhAngleCandidate3Tilt"] = 20.0, 30.0
    write_star("m.star", optics, t)
    write_mrc(tmp_path / "s.mrcs", np.zeros((6, 64, 64)), 2.2)
    with pytest.raises(InputError, match=r"^m\.star: orientation candidate 3 lacks _dhAngleCand"):
        hemnma.read_start(ParticleSet("m.star"), "network", [7])
    angles = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    write_star("angles.star", optics, t[[*angles, *[c for c in t if "Candidate" in c]]])
    write_star("p.star", optics, t.drop(columns=angles[1:]))
    write_star("hemnma.star", optics, t[angles].iloc[:2])
    argv = ["merge", "--particles", "p.star", "--inferred", "angles.star"]
    capsys.readouterr()
    assert cli([*argv, "--labelled", "hemnma.star", "--out", "o.star"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "deephemnma merge: error: angles.star: orientation candidate 3 lacks _dhAngleCandidate3Psi"
    ]
    assert not (tmp_path / "o.star").exists()
    # complete, but one value missing: refused on reading, as in any of our columns
    write_star("n.star", optics, t.assign(dhAngleCandidate3Psi=[40.0] * 3 + [np.nan] + [40.0] * 2))
    with pytest.raises(InputError, match=r"^n\.star: particle 4@s.mrcs has _dhAngleCandidate3Psi"):
        ParticleSet("n.star")
