"""RELION round trip: import a RELION 3.0 and a 3.1 STAR at one box, work at a smaller one, export."""

import numpy as np
import pandas as pd
import pytest
import starfile

from deephemnma import export, reconstruct, relion
from deephemnma.cli import main as cli
from deephemnma.files import InputError
from deephemnma.flexible import load_model
from deephemnma.fsc import model_map
from deephemnma.io import POSE_COLUMNS, ParticleSet, read_star

from .conftest import simulate_as_relion

BOX, PX, WORK = 48, 2.2, 32


@pytest.fixture(scope="module")
def originals(adk_model_files, tmp_path_factory):
    """Noise-free simulated particles (48 px, CTF) as RELION 3.1 and 3.0 STARs without our columns."""
    d = tmp_path_factory.mktemp("orig")
    optics, parts, truth = simulate_as_relion(
        d, adk_model_files / "model.npz", adk_model_files / "modes.npz", "--n-images", 40,
        "--box", BOX, "--pixel-size", PX, "--max-shift-px", 3.0, "--seed", 3,
        "--out-stacks", "stacks",
    )  # fmt: skip
    parts["rlnMicrographName"] = "mic.mrc"  # a column we never use, to be kept
    starfile.write({"optics": optics, "particles": parts}, d / "r31.star", overwrite=True)
    r30 = parts.drop(columns=["rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"])
    r30["rlnOriginX"] = parts["rlnOriginXAngst"] / PX
    r30["rlnOriginY"] = parts["rlnOriginYAngst"] / PX
    for col in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        r30[col] = optics[col].iloc[0]
    r30["rlnDetectorPixelSize"], r30["rlnMagnification"] = PX, 10000.0
    starfile.write(r30, d / "r30.star", overwrite=True)
    return d, truth


def working_group(d, star, tmp_path):
    """Import `star` at the working box; a group of every other image, shuffled, whose poses are
    the imported priors (as a perfect estimate would give) plus an amplitude column."""
    out = relion.import_particles(
        d / star, None, WORK, True, tmp_path / "w.star", tmp_path / "ws", per_stack=100
    )
    group = out.iloc[np.random.default_rng(0).permutation(len(out))[::2]].reset_index(drop=True)
    for col, prior in relion.PRIOR.items():
        group[col] = group[prior]
    group["dhAmplitudeMode7"] = np.arange(len(group), dtype=float)
    group["dhSourceAmplitudes"] = "hemnma"
    return group


@pytest.mark.parametrize("version", ["r31", "r30"])
def test_export_restores_original_images_poses_and_columns(
    originals, tmp_path, monkeypatch, version
):
    d, truth = originals
    monkeypatch.chdir(d)
    group = working_group(d, f"{version}.star", tmp_path)
    starfile.write(
        {"optics": read_star(tmp_path / "w.star")["optics"], "particles": group},
        tmp_path / "group.star",
    )
    rc = cli(
        ["export", "--group", str(tmp_path / "group.star"), "--original", f"{version}.star"]
        + ["--out", str(tmp_path / "export.star")]
    )
    assert rc == 0
    blocks = starfile.read(tmp_path / "export.star", always_dict=True)
    out, optics = blocks["particles"], blocks["optics"]
    assert (out["rlnImageName"] == group["dhSourceImageName"]).all()
    t = truth.set_index("rlnImageName").loc[out["rlnImageName"]]
    for col in POSE_COLUMNS:
        np.testing.assert_allclose(out[col], t[col], atol=1e-5, err_msg=col)
    assert np.abs(t["rlnOriginXAngst"]).max() > 1.0  # the shifts are not all zero
    original = starfile.read(d / f"{version}.star", always_dict=True)
    raw = original.get("particles", next(iter(original.values())))
    raw = raw.set_index("rlnImageName").loc[out["rlnImageName"]].reset_index()
    assert set(raw.columns) <= set(out.columns)
    for col in ("rlnDefocusU", "rlnDefocusV", "rlnMicrographName"):
        assert (out[col].to_numpy() == raw[col].to_numpy()).all(), col
    assert out["dhAmplitudeMode7"].tolist() == group["dhAmplitudeMode7"].tolist()
    if version == "r31":
        pd.testing.assert_frame_equal(optics, original["optics"], check_dtype=False)
    else:  # pixel origins of the original images, and the optics block RELION 3.1 would build
        np.testing.assert_allclose(out["rlnOriginX"], t["rlnOriginXAngst"] / PX, atol=1e-5)
        assert optics["rlnImagePixelSize"].iloc[0] == PX and optics["rlnImageSize"].iloc[0] == BOX
    ps = ParticleSet(tmp_path / "export.star", [d])
    assert ps.box == BOX and ps.pixel_size == pytest.approx(PX)


def sign_correlations(star, optics, parts, model, box, pixel_size, tmp_path, roots=()):
    """{+1, -1}: correlation with `model` of the map reconstructed from `parts` with the origins
    as they are (+1) and with the opposite sign (-1)."""
    corr = {}
    for sign in (1, -1):
        flipped = parts.copy()
        flipped[["rlnOriginXAngst", "rlnOriginYAngst"]] *= sign
        starfile.write({"optics": optics, "particles": flipped}, tmp_path / f"{star}{sign}.star")
        ps = ParticleSet(tmp_path / f"{star}{sign}.star", list(roots))
        assert ps.box == box and ps.pixel_size == pytest.approx(pixel_size)
        rows = np.arange(len(ps))
        _, _, vol = reconstruct.reconstruct_halves(ps, rows, rows % 2, 1.0)
        corr[sign] = np.corrcoef(vol.ravel(), model.ravel())[0, 1]
    return corr


@pytest.mark.parametrize("version", ["r31", "r30"])
def test_exported_origin_sign_reconstructs_the_model(
    originals, adk_model_files, tmp_path, monkeypatch, version
):
    """The same origins in Å rebuild the model from the working images (32 px, 3.3 Å) and, once
    exported, from the original images (48 px, 2.2 Å); the opposite origin sign does not."""
    d, truth = originals
    monkeypatch.chdir(d)
    group = working_group(d, f"{version}.star", tmp_path)
    working_optics = read_star(tmp_path / "w.star")["optics"]
    optics, out = export.export_group(group, d / f"{version}.star", BOX)
    m = load_model(adk_model_files / "model.npz")
    amps = truth.set_index("rlnImageName").loc[out["rlnImageName"]]
    mean_model = m["coords"] + np.tensordot(
        amps[[f"dhAmplitudeMode{k}" for k in (7, 8, 9)]].mean().to_numpy(),
        np.load(adk_model_files / "modes.npz")["modes"],
        axes=1,
    )
    work_px = PX * BOX / WORK
    corr_w = sign_correlations(
        "w", working_optics, group, model_map(mean_model, m["weights"], WORK, work_px, 1.0),
        WORK, work_px, tmp_path, [tmp_path],
    )  # fmt: skip
    corr_o = sign_correlations(
        "o", optics, out, model_map(mean_model, m["weights"], BOX, PX, 1.0), BOX, PX, tmp_path
    )
    print(
        f"{version}: map vs model correlation, origins as exported / flipped: working box "
        f"{corr_w[1]:.3f} / {corr_w[-1]:.3f}, original box {corr_o[1]:.3f} / {corr_o[-1]:.3f}"
    )
    for corr in (corr_w, corr_o):
        assert corr[1] > 0.5 and corr[1] > corr[-1] + 0.2


def test_export_errors(originals, tmp_path):
    d, _ = originals
    group = pd.DataFrame({"rlnImageName": ["1@x.mrcs"], "dhSourceImageName": ["999@nowhere.mrcs"]})
    for col in POSE_COLUMNS:
        group[col] = 0.0
    with pytest.raises(InputError, match="has no particle 999@nowhere.mrcs"):
        export.export_group(group, d / "r31.star", BOX)
    with pytest.raises(InputError, match="lacks _dhSourceImageName"):
        export.export_group(group.drop(columns="dhSourceImageName"), d / "r31.star", BOX)


def test_export_cli_refuses_an_optics_box_the_stacks_do_not_have(originals, tmp_path, capsys):
    d, _ = originals
    blocks = starfile.read(d / "r31.star", always_dict=True)
    blocks["optics"]["rlnImageSize"] = 32  # the stacks hold 48-pixel images
    starfile.write(blocks, d / "box32.star", overwrite=True)
    group = blocks["particles"].iloc[:2][["rlnImageName", *POSE_COLUMNS]].copy()
    group["dhSourceImageName"] = group["rlnImageName"]
    starfile.write({"optics": blocks["optics"], "particles": group}, tmp_path / "g.star")
    argv = ["export", "--group", str(tmp_path / "g.star"), "--original", str(d / "box32.star")]
    assert cli([*argv, "--out", str(tmp_path / "o.star")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "box32.star: rlnImageSize [32] but the stacks hold 48-pixel" in err[0]
    assert not (tmp_path / "o.star").exists()
