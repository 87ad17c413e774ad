import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma import geometry, hemnma
from deephemnma.cli import main as cli
from deephemnma.io import InputError, ParticleSet, load_model, load_modes
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
    m, md = load_model(adk_model_files / "model.npz"), load_modes(adk_model_files / "modes.npz")
    settings = hemnma.AlignSettings(iterations=(30, 60))
    al = hemnma.Aligner(
        m["coords"], md["modes"], m["weights"], ps.box, ps.pixel_size, settings, torch.device("cpu")
    )
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


def test_global_search_finds_the_orientation(adk_model_files, tmp_path, monkeypatch):
    star = simulate(tmp_path, adk_model_files, 6, 32, 4.4, True, seed=2)
    monkeypatch.chdir(tmp_path)
    ps = ParticleSet(star)
    m, md = load_model(adk_model_files / "model.npz"), load_modes(adk_model_files / "modes.npz")
    settings = hemnma.AlignSettings(n_directions=400, psi_step=10, candidates=3)
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    gallery = hemnma.Gallery(t(m["coords"]), t(md["modes"]), t(m["weights"]), 32, 4.4, settings)
    target = hemnma.make_target(t(ps.images[:]), ps.ctf_params(), np.arange(6), 32, 4.4, True)
    eul, _, amps = hemnma.global_search(target, gallery, settings, 32)
    assert amps.shape == (6, 3, 3) and set(np.unique(amps)) <= {-100.0, 0.0, 100.0}
    best = np.array([geometry.euler_distance_deg(eul[i], ps.euler()[i]).min() for i in range(6)])
    # the grid spacing is about 10 degrees; amplitudes up to ±150 are not modelled in the search
    assert np.median(best) < 12.0


def test_gallery_rotation_matches_projection(adk_model_files):
    m = load_model(adk_model_files / "model.npz")
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    settings = hemnma.AlignSettings(n_directions=20, psi_step=30, gallery_amplitude=0.0)
    g = hemnma.Gallery(
        t(m["coords"]), torch.zeros(3, len(m["coords"]), 3), t(m["weights"]), 32, 4.4, settings
    )
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
