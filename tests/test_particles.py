import os
import re

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma import geometry, imaging, relion, simulate
from deephemnma.cli import main as cli
from deephemnma.files import InputError
from deephemnma.io import ParticleSet
from deephemnma.mrc import write_mrc

from .conftest import sim_config


@pytest.fixture(scope="module")
def sim(adk_model_files, tmp_path_factory):
    """A small simulated set (32 px, CTF + noise) with 3 stacks."""
    d = tmp_path_factory.mktemp("sim")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        rc = cli(
            [
                "simulate",
                "--model",
                str(adk_model_files / "model.npz"),
                "--modes",
                str(adk_model_files / "modes.npz"),
                "--n-images",
                "50",
                "--box",
                "32",
                "--pixel-size",
                "4.4",
                "--snr",
                "0.1",
                "--images-per-stack",
                "20",
                "--batch",
                "16",
                "--out-star",
                "p/particles.star",
                "--out-stacks",
                "p/stacks",
                "--out-montage",
                "p/montage.png",
            ]
        )
    finally:
        os.chdir(cwd)
    assert rc == 0
    return d


def test_simulated_star_is_relion(sim):
    blocks = starfile.read(sim / "p/particles.star", always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    parts = blocks["particles"]
    for col in [
        "rlnImageName",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnPhaseShift",
        "rlnOpticsGroup",
        "dhAmplitudeMode7",
        "dhAmplitudeMode9",
    ]:
        assert col in parts
    assert len(parts) == 50
    assert parts["rlnImageName"].iloc[20] == "000001@p/stacks/stack_0001.mrcs"
    assert np.abs(parts["dhAmplitudeMode8"]).max() <= 150
    assert blocks["optics"]["rlnImageSize"].iloc[0] == 32
    with mrcfile.open(sim / "p/stacks/stack_0002.mrcs") as m:
        assert m.data.shape == (10, 32, 32) and m.voxel_size.x == pytest.approx(4.4)


def test_simulate_reproducible_and_matches_direct_projection(adk_model_files):
    from deephemnma.flexible import FlexibleModel

    flexible = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    model = {"coords": flexible.coords, "weights": flexible.weights}
    modes = {"modes": flexible.modes, "mode_numbers": flexible.mode_numbers}
    cfg = sim_config(
        seed=3,
        amplitude_scale=100.0,
        max_shift_px=2.0,
        defocus=[4000.0, 6000.0],
        pixel_size=4.4,
        box=32,
        oversample=1,
        sigma_angstrom=1.5,
        ctf=False,
    )
    p1 = simulate.draw_parameters(5, modes["mode_numbers"], cfg)
    p2 = simulate.draw_parameters(5, modes["mode_numbers"], cfg)
    assert p1.equals(p2)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    out = simulate.render(flexible.to(dtype=torch.float64), p1, cfg, torch.Generator())
    # independent: deform with numpy, project one image with the matrix from RELION's formula
    row = p1.iloc[2]
    amps = row[["dhAmplitudeMode7", "dhAmplitudeMode8", "dhAmplitudeMode9"]].to_numpy(float)
    x = model["coords"] + np.tensordot(amps, modes["modes"], axes=1)
    a = geometry.euler_to_matrix(
        row[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    )
    d = -row[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / 4.4
    ref = imaging.project(t(x), t(a)[None], t(d)[None], t(model["weights"]), 32, 4.4, 1.5)[0]
    np.testing.assert_allclose(out["clean"][2].numpy(), ref.numpy(), atol=1e-10)


@pytest.mark.parametrize("max_shift_px", [2.0, 14.0])  # atoms inside; atoms past the edges
def test_oversampled_render_equals_projecting_atoms_at_their_width(adk_model_files, max_shift_px):
    """Narrow atoms widened in Fourier space (inside) or atoms at full width (near the edges):
    the images equal the atoms projected at their width on the oversampled grid and cropped."""
    from deephemnma.flexible import FlexibleModel

    flexible = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    cfg = sim_config(
        seed=5, pixel_size=2.0, box=48, oversample=2, sigma_angstrom=1.6, ctf=False,
        max_shift_px=max_shift_px,
    )  # fmt: skip
    params = simulate.draw_parameters(4, flexible.mode_numbers, cfg)
    f64 = flexible.to(dtype=torch.float64)
    out = simulate.render(f64, params, cfg, torch.Generator())["clean"].numpy()
    t = lambda a: torch.tensor(np.asarray(a, dtype=float))
    amps = params[["dhAmplitudeMode7", "dhAmplitudeMode8", "dhAmplitudeMode9"]].to_numpy(float)
    rot = geometry.euler_to_matrix(t(params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]]))
    shift = -t(params[["rlnOriginXAngst", "rlnOriginYAngst"]]) / 1.0  # pixels of the 96-px grid
    proj = imaging.project(f64.deform(t(amps)), rot, shift, f64.weights, 96, 1.0, 1.6)
    want = imaging.fourier_crop(proj, 48).numpy()
    assert np.abs(out - want).max() < 1e-4 * np.abs(want).max()


def test_amplitude_distributions():
    rng = np.random.default_rng(0)
    u = simulate.draw_amplitudes(4000, 3, "uniform", 150, 3, rng)
    assert np.abs(u).max() <= 150 and u.std() == pytest.approx(150 / np.sqrt(3), rel=0.05)
    line = simulate.draw_amplitudes(2000, 3, "line", 150, 3, rng)
    sv = np.linalg.svd(line - line.mean(0), compute_uv=False)
    assert sv[1] / sv[0] < 0.1  # essentially one-dimensional
    cl = simulate.draw_amplitudes(3000, 3, "clusters", 150, 3, rng)
    from sklearn.cluster import KMeans

    assert KMeans(3, n_init=5, random_state=0).fit(cl).inertia_ / len(cl) < 3 * 15.0**2 * 1.2


def test_simulate_then_import_round_trip(sim, tmp_path, monkeypatch):
    monkeypatch.chdir(sim)
    out = tmp_path / "imp"
    relion.import_particles(
        sim / "p/particles.star",
        None,
        None,
        False,
        out / "particles.star",
        out / "stacks",
        per_stack=1000,
    )
    a, b = ParticleSet(sim / "p/particles.star"), ParticleSet(out / "particles.star")
    np.testing.assert_array_equal(a.images[:], b.images[:])
    np.testing.assert_array_equal(
        a.euler(), b.table[["rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior"]].to_numpy()
    )
    np.testing.assert_array_equal(a.amplitudes([7, 8, 9]), b.amplitudes([7, 8, 9]))
    for key, val in a.ctf_params().items():
        np.testing.assert_array_equal(val, b.ctf_params()[key], err_msg=key)
    assert b.pixel_size == a.pixel_size and b.box == a.box


def test_import_crop_and_normalise(sim, tmp_path, monkeypatch):
    monkeypatch.chdir(sim)
    relion.import_particles(
        sim / "p/particles.star",
        None,
        16,
        True,
        tmp_path / "p.star",
        tmp_path / "s",
        per_stack=1000,
    )
    b = ParticleSet(tmp_path / "p.star")
    assert b.box == 16 and b.pixel_size == pytest.approx(8.8)
    imgs = torch.from_numpy(b.images[:])
    bg = imgs[:, ~imaging.circular_mask(16, 0.9 * 8)]
    np.testing.assert_allclose(bg.mean(1).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(1).numpy(), 1, atol=1e-5)


def test_import_normalises_outside_the_mask_diameter(sim, tmp_path, monkeypatch):
    """particles.import.mask_diameter (Å, RELION's --particle_diameter) sets the background."""
    monkeypatch.chdir(sim)
    args = (sim / "p/particles.star", None, 16, True, tmp_path / "p.star", tmp_path / "s", 1000)
    relion.import_particles(*args, mask_diameter=88.0)  # 16 px of 8.8 Å: a 5-px radius
    imgs = torch.from_numpy(ParticleSet(tmp_path / "p.star").images[:])
    bg = imgs[:, ~imaging.circular_mask(16, 5.0)]
    np.testing.assert_allclose(bg.mean(1).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(1).numpy(), 1, atol=1e-5)
    default = imgs[:, ~imaging.circular_mask(16, 0.9 * 8)]
    assert np.abs(default.std(1).numpy() - 1).max() > 1e-3  # not the default background
    with pytest.raises(InputError, match="mask diameter 200 Å is not within the working box"):
        relion.import_particles(*args, mask_diameter=200.0)


def relion30_star(path, names, extra=None):
    import pandas as pd

    df = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": 5000.0,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnDetectorPixelSize": 5.0,
            "rlnMagnification": 10000.0,
            "rlnOriginX": 1.0,
        }
    )
    for k, v in (extra or {}).items():
        df[k] = v
    starfile.write(df, path, overwrite=True)


def test_import_relion30_units(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mrc(tmp_path / "a.mrcs", np.random.default_rng(0).normal(size=(3, 16, 16)), 5.0)
    relion30_star(tmp_path / "in.star", ["1@a.mrcs", "3@a.mrcs"])
    out = relion.import_particles(
        tmp_path / "in.star", None, None, False, tmp_path / "o.star", tmp_path / "o", 100
    )
    assert out["rlnOriginXPriorAngst"].tolist() == [5.0, 5.0]  # 1 px at 5 Å/px
    b = ParticleSet(tmp_path / "o.star")
    assert b.pixel_size == 5.0
    with mrcfile.open(tmp_path / "a.mrcs") as m:
        np.testing.assert_array_equal(b.images[1:2][0], m.data[2])


def test_import_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "a.mrcs", rng.normal(size=(3, 16, 16)), 5.0)
    write_mrc(tmp_path / "b.mrcs", rng.normal(size=(3, 24, 24)), 5.0)
    nan = rng.normal(size=(2, 16, 16))
    nan[1, 3, 3] = np.nan
    write_mrc(tmp_path / "nan.mrcs", nan, 5.0)
    (tmp_path / "corrupt.mrcs").write_bytes(b"\x00" * 1500)
    raw = (tmp_path / "a.mrcs").read_bytes()
    (tmp_path / "trunc.mrcs").write_bytes(raw[: len(raw) // 2])

    def run(names, **extra):
        relion30_star(tmp_path / "in.star", names, extra)
        relion.import_particles(
            tmp_path / "in.star", None, None, False, tmp_path / "o.star", tmp_path / "o", 100
        )

    with pytest.raises(InputError, match="not found"):
        run(["1@missing.mrcs"])
    with pytest.raises(InputError, match="beyond the stack's 3 images"):
        run(["4@a.mrcs"])
    with pytest.raises(InputError, match="mixed box sizes"):
        run(["1@a.mrcs", "1@b.mrcs"])
    with pytest.raises(InputError, match=r"2@nan.mrcs contains NaN"):
        run(["1@nan.mrcs", "2@nan.mrcs"])
    with pytest.raises(InputError, match="corrupt.mrcs: not a valid MRC"):
        run(["1@corrupt.mrcs"])
    with pytest.raises(InputError, match="trunc.mrcs: not a valid MRC"):
        run(["1@trunc.mrcs"])
    starfile.write(
        {"particles": __import__("pandas").DataFrame({"rlnImageName": ["1@a.mrcs"]})},
        tmp_path / "nodf.star",
        overwrite=True,
    )
    with pytest.raises(InputError, match="missing column.*_rlnDefocusU"):
        relion.import_particles(
            tmp_path / "nodf.star", None, None, False, tmp_path / "o.star", tmp_path / "o", 100
        )
    assert not (tmp_path / "o.star").exists()
    assert not list((tmp_path / "o").glob("*.mrcs")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mode", r"a\.mrcs: not a valid MRC file \(MRC file is \d+ bytes larger than expected"),
        ("square", r"a\.mrcs: images are 24x16 pixels; square images are required"),
        ("numeric", r"in\.star: particle 2@a\.mrcs has _rlnDefocusU 'abc', not a finite number"),
    ],
)
def test_import_bad_input_is_a_one_line_error(tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "a.mrcs", rng.normal(size=(3, 16, 24 if case == "square" else 16)), 5.0)
    if case == "mode":  # the header says int16 (mode 1) but the file holds float32 data
        raw = bytearray((tmp_path / "a.mrcs").read_bytes())
        raw[12:16] = np.int32(1).tobytes()
        (tmp_path / "a.mrcs").write_bytes(bytes(raw))
    extra = {"rlnDefocusU": ["5000", "abc"]} if case == "numeric" else None
    relion30_star(tmp_path / "in.star", ["1@a.mrcs", "2@a.mrcs"], extra)
    rc = cli(["import", "--star", "in.star", "--out-star", "o.star", "--out-stacks", "o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "o.star").exists()


def test_import_datadir(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_mrc(data / "a.mrcs", np.ones((2, 16, 16)), 5.0)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    relion30_star(tmp_path / "work/in.star", ["2@a.mrcs"])
    with pytest.raises(InputError, match="not found"):
        relion.import_particles(
            tmp_path / "work/in.star", None, None, False, tmp_path / "o.star", tmp_path / "o", 100
        )
    relion.import_particles(
        tmp_path / "work/in.star", data, None, False, tmp_path / "o.star", tmp_path / "o", 100
    )
    assert len(ParticleSet(tmp_path / "o.star")) == 1


def test_import_keeps_amplitudes_but_not_an_earlier_runs_judgments():
    """A STAR exported by an earlier run carries its costs, flags and trust: the import keeps
    the amplitudes (e.g. a simulator's truth) and drops the rest, so nothing stale is reused."""
    parts = pd.DataFrame(
        {
            "rlnImageName": ["1@a.mrcs", "2@a.mrcs"],
            "rlnDefocusU": [1e4, 2e4],
            "rlnDefocusV": [1e4, 2e4],
            "rlnDefocusAngle": [0.0, 0.0],
            "rlnPhaseShift": [0.0, 0.0],
            "dhAmplitudeMode7": [10.0, -5.0],
            "dhTrusted": [0, 1],
            "dhFlagged": [1, 0],
            "dhCost": [0.7, 0.6],
            "dhSourceAmplitudes": ["network", "hemnma"],
        }
    )
    out = relion.imported_table(parts, ["1@b.mrcs", "2@b.mrcs"])
    assert [c for c in out if c.startswith("dh")] == ["dhAmplitudeMode7", "dhSourceImageName"]
    assert out["dhAmplitudeMode7"].tolist() == [10.0, -5.0]
    assert out["dhSourceImageName"].tolist() == ["1@a.mrcs", "2@a.mrcs"]
