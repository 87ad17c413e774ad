import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from deephemnma import geometry, imaging
from deephemnma import reconstruct as rec
from deephemnma.cli import main as cli
from deephemnma.flexible import load_model
from deephemnma.fsc import fsc_curve, model_map, resolution
from deephemnma.io import ParticleSet, optics_table, write_star
from deephemnma.mrc import write_mrc


def test_noise_free_reconstruction_matches_true_map(adk_model_files):
    m = load_model(adk_model_files / "model.npz")
    box, px, sigma, n = 32, 4.4, 3.0, 1500
    truth = model_map(m["coords"], m["weights"], box, px, sigma)
    # projector and 3D map agree: the z-sum of the map is the projection at identity pose
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    proj = imaging.project(
        t(m["coords"]),
        torch.eye(3, dtype=torch.float64)[None],
        torch.zeros(1, 2, dtype=torch.float64),
        t(m["weights"]),
        box,
        px,
        sigma,
    )[0]
    np.testing.assert_allclose(truth.sum(0) * px, proj.numpy(), atol=1e-4 * proj.max().item())
    rng = np.random.default_rng(0)
    rot = geometry.euler_to_matrix(t(geometry.random_euler(n, rng)))
    shifts = t(rng.uniform(-2, 2, (n, 2)))
    imgs = imaging.project(t(m["coords"]), rot, shifts, t(m["weights"]), box, px, sigma)
    acc = rec.FourierAccumulator(box)
    for s in range(0, n, 250):
        acc.insert(imgs[s : s + 250], rot[s : s + 250], shifts[s : s + 250], None)
    curve = fsc_curve(acc.volume(1e-6), truth)
    print("FSC vs true map:", np.round(curve, 3))
    assert curve[: int(0.8 * (box // 2)) + 1].min() >= 0.9
    # transposed rotations (a classic convention error) give a poor map
    bad = rec.FourierAccumulator(box)
    bad.insert(imgs[:500], rot[:500].transpose(1, 2), shifts[:500], None)
    assert fsc_curve(bad.volume(1e-6), truth)[6:14].mean() < 0.4


def test_resolution_from_curve():
    curve = np.array([1.0, 0.9, 0.6, 0.3, 0.1, 0.0])
    assert resolution(curve, 10, 2.0, 0.5) == pytest.approx(20 / (2 + 0.1 / 0.3))
    assert resolution(np.ones(6), 10, 2.0, 0.143) == 4.0


def test_half_map_fsc_improves_with_more_images(adk_model_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        cli(
            [
                "simulate",
                "--model",
                str(adk_model_files / "model.npz"),
                "--modes",
                str(adk_model_files / "modes.npz"),
                "--n-images",
                "1200",
                "--box",
                "32",
                "--pixel-size",
                "4.4",
                "--snr",
                "0.3",
                "--amplitude-scale",
                "0",
                "--defocus",
                "8000",
                "12000",
                "--batch",
                "64",
                "--out-star",
                "p.star",
                "--out-stacks",
                "s",
            ]
        )
        == 0
    )
    ps = ParticleSet("p.star")
    res = []
    for n in (100, 1200):
        rows = np.arange(n)
        half = np.random.default_rng(0).permutation(n) % 2
        h1, h2, _ = rec.reconstruct_halves(ps, rows, half)
        res.append(resolution(fsc_curve(h1, h2), 32, 4.4, 0.143))
    print("half-map resolution (Å) with 100 and 1200 images:", np.round(res, 1))
    assert res[1] < res[0] - 1.0


def test_reconstruct_and_fsc_cli(adk_model_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        cli(
            [
                "simulate",
                "--model",
                str(adk_model_files / "model.npz"),
                "--modes",
                str(adk_model_files / "modes.npz"),
                "--n-images",
                "300",
                "--box",
                "32",
                "--pixel-size",
                "4.4",
                "--amplitude-scale",
                "0",
                "--out-star",
                "p.star",
                "--out-stacks",
                "s",
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "reconstruct",
                "--particles",
                "p.star",
                "--out-half1",
                "h1.mrc",
                "--out-half2",
                "h2.mrc",
                "--out-map",
                "map.mrc",
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "fsc",
                "--half1",
                "h1.mrc",
                "--half2",
                "h2.mrc",
                "--map",
                "map.mrc",
                "--centroid-pdb",
                str(adk_model_files / "model.pdb"),
                "--model",
                str(adk_model_files / "model.npz"),
                "--out-model-map",
                "ref.mrc",
                "--out-csv",
                "fsc.csv",
                "--out-json",
                "fsc.json",
                "--out-figure",
                "fsc.png",
            ]
        )
        == 0
    )
    import json

    out = json.loads(open("fsc.json", encoding="utf-8").read())
    print(out)
    # noise-free (CTF only) with true poses: the map matches the model well beyond 15 Å
    assert out["model_0.5"] < 15.0
    assert os.path.getsize("fsc.png") > 1000


def group_star(d, defocus_u=(5000.0, 5000.0, 5000.0), nan_image=None):
    """A three-particle group STAR in our format with a 16-px stack (NaN pixels in `nan_image`)."""
    imgs = np.random.default_rng(0).normal(size=(3, 16, 16))
    if nan_image is not None:
        imgs[nan_image, 5, 5] = np.nan
    write_mrc(d / "s.mrcs", imgs, 4.0)
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@s.mrcs" for i in (1, 2, 3)],
            "rlnOpticsGroup": 1,
            "rlnAngleRot": [0.0, 30.0, 60.0],
            "rlnAngleTilt": 90.0,
            "rlnAnglePsi": 0.0,
            "rlnOriginXAngst": 0.0,
            "rlnOriginYAngst": 0.0,
            "rlnDefocusU": list(defocus_u),
            "rlnDefocusV": 5000.0,
            "rlnDefocusAngle": 0.0,
            "rlnPhaseShift": 0.0,
        }
    )
    write_star(d / "g.star", optics_table(4.0, 16, 300.0, 2.7, 0.1), parts)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"defocus_u": ("5000", "abc", "5000")},
            r"g\.star: particle 000002@s\.mrcs has _rlnDefocusU 'abc', not a finite number",
        ),
        ({"nan_image": 2}, r"image 000003@s\.mrcs contains NaN or Inf pixels"),
    ],
)
def test_reconstruct_bad_group_is_a_one_line_error(tmp_path, monkeypatch, capsys, bad, message):
    monkeypatch.chdir(tmp_path)
    group_star(tmp_path, **bad)
    outs = ["--out-half1", "h1.mrc", "--out-half2", "h2.mrc", "--out-map", "map.mrc"]
    assert cli(["reconstruct", "--particles", "g.star", *outs]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deephemnma reconstruct: error: ")
    assert re.search(message, err), err
    assert not list(tmp_path.glob("*.mrc"))


def exact_fourier_particles(d, n, box=32, px=3.0, sigma=3.0, seed=1):
    """(true map, clean images): particles whose DFTs are the exact Fourier transform of Gaussian
    blobs on the central slice (CTF, shifts, uniform poses; their STAR written to d / p.star), and
    the blobs' map from the same closed form on the 3D DFT grid."""
    rng = np.random.default_rng(seed)
    pos, w = rng.uniform(-20, 20, (12, 3)), rng.uniform(0.5, 1.5, 12)
    m = np.fft.fftfreq(box, 1 / box)
    k = m / (box * px)
    phase = np.exp(-2j * np.pi * m * (box // 2) / box) * (np.abs(m) < box // 2)
    g = np.exp(-2 * np.pi**2 * sigma**2 * k**2) * phase  # per axis: Gaussian, centre, no Nyquist
    e = lambda x: np.exp(-2j * np.pi * x[..., None] * k)  # (..., atoms, box)
    truth = np.fft.ifftn(
        np.einsum("a,az,ay,ax->zyx", w, e(pos[:, 2]) * g, e(pos[:, 1]) * g, e(pos[:, 0]) * g)
    ).real
    euler = geometry.random_euler(n, rng)
    xy = np.einsum("bij,aj->bai", geometry.euler_to_matrix(euler)[:, :2], pos)
    shift = rng.uniform(-2, 2, (n, 2)) * px
    xy += shift[:, None]
    f = np.einsum("a,bay,bax->byx", w, e(xy[..., 1]) * g, e(xy[..., 0]) * g)
    defocus = torch.tensor(rng.uniform(8000, 15000, n), dtype=torch.float32)
    ctf = imaging.ctf(defocus, defocus, torch.zeros(n), 300, 2.7, 0.1, px, box, bfactor=0.0)
    ctf_full = torch.cat([ctf, ctf[..., 1 : box // 2].flip(-1)], dim=-1).numpy()
    clean = np.fft.ifft2(f * ctf_full).real.astype(np.float32)
    clean /= clean.std()
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@s.mrcs" for i in range(n)],
            "rlnOpticsGroup": 1,
            "rlnAngleRot": euler[:, 0],
            "rlnAngleTilt": euler[:, 1],
            "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": -shift[:, 0],
            "rlnOriginYAngst": -shift[:, 1],
            "rlnDefocusU": defocus.numpy(),
            "rlnDefocusV": defocus.numpy(),
            "rlnDefocusAngle": 0.0,
            "rlnPhaseShift": 0.0,
        }
    )
    write_star(d / "p.star", optics_table(px, box, 300.0, 2.7, 0.1), parts)
    return truth, clean


def with_noise(d, clean, snr, seed=2):
    """Write the stack (clean + white noise at `snr`, none if None) and read the particles back."""
    rng = np.random.default_rng(seed)
    imgs = clean if snr is None else clean + rng.normal(0, 1 / snr**0.5, clean.shape)
    write_mrc(d / "s.mrcs", imgs.astype(np.float32), 3.0)
    return ParticleSet(d / "p.star")


def test_reconstruction_of_exact_fourier_projections(tmp_path):
    """Exact Fourier projections (CTF, shifts, uniform poses, read back from a STAR): the map
    matches the closed-form map: noise-free to 0.9 Nyquist, at SNR 1 to 0.7."""
    n, box = 800, 32
    truth, clean = exact_fourier_particles(tmp_path, n, box)
    half = np.arange(n) % 2
    for snr, upto, fsc_min, cc_min in ((None, 0.9, 0.98, 0.99), (1.0, 0.7, 0.9, 0.98)):
        ps = with_noise(tmp_path, clean, snr)
        _, _, full = rec.reconstruct_halves(ps, np.arange(n), half)
        curve = fsc_curve(full, truth)
        cc = np.corrcoef(full.ravel(), truth.ravel())[0, 1]
        print(f"SNR {snr}: cc {cc:.4f}, FSC vs truth", np.round(curve, 3))
        assert curve[: int(upto * box // 2) + 1].min() >= fsc_min
        assert cc >= cc_min


def test_fsc_regularisation_and_oversampling(tmp_path):
    """The two choices of the reconstruction, each against its alternative on the same particles:
    the volume grid 2x oversampled beats inserting on the box's own grid without noise (a smaller
    trilinear error, 1 - FSC vs truth below 0.3x between 0.7 Nyquist and Nyquist); at SNR 0.05 the FSC-based regularisation beats none (tau2_fudge 1e6:
    reg ~ 0) in cc vs the true map, and the full map's FSC vs truth follows the half-maps' FSC
    through C_ref = sqrt(2 FSC / (1 + FSC)) (Rosenthal & Henderson 2003) where there is signal."""
    n, box = 800, 32
    truth, clean = exact_fourier_particles(tmp_path, n, box)
    half = np.arange(n) % 2
    rows = np.arange(n)
    ps = with_noise(tmp_path, clean, None)
    high = slice(int(0.7 * box // 2), box // 2)  # 0.7 Nyquist to the shell below it
    fine, coarse = (
        fsc_curve(rec.reconstruct_halves(ps, rows, half, pad=p)[2], truth) for p in (2, 1)
    )
    print(
        "noise-free FSC vs truth, pad 2:",
        np.round(fine[high], 3),
        "pad 1:",
        np.round(coarse[high], 3),
    )
    assert (1 - fine[high]).mean() < 0.3 * (1 - coarse[high]).mean()
    ps = with_noise(tmp_path, clean, 0.05)
    h1, h2, full = rec.reconstruct_halves(ps, rows, half)
    raw = rec.reconstruct_halves(ps, rows, half, tau2_fudge=1e6)[2]
    cc = lambda v: np.corrcoef(v.ravel(), truth.ravel())[0, 1]
    print(f"SNR 0.05: cc regularised {cc(full):.3f}, unregularised {cc(raw):.3f}")
    assert cc(full) > cc(raw) + 0.05
    fsc = fsc_curve(h1, h2)
    c_ref = np.sqrt(2 * fsc.clip(0) / (1 + fsc.clip(0)))
    truth_fsc = fsc_curve(full, truth)
    sig = (fsc > 0.2) & (np.arange(len(fsc)) > 0)
    print("FSC vs truth", np.round(truth_fsc[sig], 3), "C_ref", np.round(c_ref[sig], 3))
    np.testing.assert_allclose(truth_fsc[sig], c_ref[sig], atol=0.03)
