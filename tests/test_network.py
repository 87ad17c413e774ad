import os

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma import geometry, infer, simulate, train
from deephemnma.cli import main as cli
from deephemnma.io import ParticleSet, load_model, load_modes
from deephemnma.nets import ResNet, n_parameters
from deephemnma.split import split_sets

from .conftest import sim_config


def test_quaternion_loss_sign_invariant_and_grows():
    rng = np.random.default_rng(0)
    q = torch.tensor(geometry.random_quaternions(50, rng))
    assert float(train.quaternion_loss(q, q)) == pytest.approx(0, abs=1e-12)
    assert float(train.quaternion_loss(-q, q)) == pytest.approx(0, abs=1e-12)
    assert float(train.quaternion_loss(3 * q, q)) == pytest.approx(0, abs=1e-12)  # unnormalised
    base = np.array([[20.0, 50.0, 10.0]])
    losses = []
    for d in (5, 20, 60, 120):
        other = base + [0, 0, d]
        losses.append(
            float(
                train.quaternion_loss(
                    torch.tensor(geometry.euler_to_quaternion(other)),
                    torch.tensor(geometry.euler_to_quaternion(base)),
                )
            )
        )
    assert np.all(np.diff(losses) > 0)
    # 1 - cos²(θ/2) = sin²(θ/2)
    assert losses[2] == pytest.approx(np.sin(np.radians(30)) ** 2)


def test_resnet_parameter_counts():
    counts = {a: n_parameters(ResNet(a, 3)) / 1e6 for a in ("resnet34", "resnet50", "resnet101")}
    print("parameters (M):", {k: round(v, 1) for k, v in counts.items()}, "seed: 24, 26, 47")
    assert 20 < counts["resnet34"] < 25 and 24 < counts["resnet50"] < 28
    assert 42 < counts["resnet101"] < 48
    out = ResNet("resnet18", 4)(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 4)


def test_rotation_augmentation_matches_resimulation(adk_model_files):
    """Rotating an image by α and updating (psi, shift) gives the image simulated with the new labels."""
    m, md = load_model(adk_model_files / "model.npz"), load_modes(adk_model_files / "modes.npz")
    cfg = sim_config(
        seed=5,
        amplitude_scale=100.0,
        max_shift_px=3.0,
        pixel_size=2.2,
        box=64,
        oversample=1,
        sigma_angstrom=2.5,
        ctf=False,
    )
    params = simulate.draw_parameters(4, md["mode_numbers"], cfg)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    render = lambda p: simulate.render(
        t(m["coords"]),
        t(md["modes"]),
        t(m["weights"]),
        p,
        md["mode_numbers"],
        cfg,
        torch.Generator(),
    )["clean"]
    before = render(params)
    turns = torch.tensor([1, 2, 3, -1])
    alpha = 90.0 * turns.double()
    shift_t = t([[1.0, -2.0], [0.0, 0.0], [-1.0, 0.0], [2.0, 2.0]])
    euler = t(params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    shifts = -t(params[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / cfg.pixel_size
    new_euler, new_shift = train.transform_labels(euler, shifts, alpha, shift_t)
    moved = params.copy()
    moved[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = new_euler.numpy()
    moved[["rlnOriginXAngst", "rlnOriginYAngst"]] = -new_shift.numpy() * cfg.pixel_size
    expected = render(moved)
    got = train.transform_images(before, turns, shift_t)
    a = (got - got.mean((1, 2), keepdim=True)).flatten(1)
    b = (expected - expected.mean((1, 2), keepdim=True)).flatten(1)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.min() > 0.999, corr
    # and a wrong label update (psi - alpha) would not match
    wrong = moved.copy()
    wrong["rlnAnglePsi"] = euler[:, 2].numpy() - alpha.numpy()
    w = render(wrong)
    wb = (w - w.mean((1, 2), keepdim=True)).flatten(1)
    assert ((a * wb).sum(1) / (a.norm(dim=1) * wb.norm(dim=1))).min() < 0.9


def test_split_sets():
    s = split_sets(100, 0.15, 10, seed=3)
    assert (s == "test").sum() == 10 and (s == "val").sum() == 15 and (s == "train").sum() == 75
    assert list(split_sets(100, 0.15, 10, seed=3)) == list(s)


@pytest.fixture(scope="module")
def labelled(adk_model_files, tmp_path_factory):
    """160 simulated 32-px images (no CTF, SNR 1) with truth labels and a split."""
    d = tmp_path_factory.mktemp("net")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert (
            cli(
                [
                    "simulate",
                    "--model",
                    str(adk_model_files / "model.npz"),
                    "--modes",
                    str(adk_model_files / "modes.npz"),
                    "--n-images",
                    "160",
                    "--box",
                    "32",
                    "--pixel-size",
                    "4.4",
                    "--no-ctf",
                    "--snr",
                    "1.0",
                    "--max-shift-px",
                    "2",
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
                    "split",
                    "--labels",
                    "p.star",
                    "--n-val",
                    "32",
                    "--n-test",
                    "16",
                    "--out",
                    "split.csv",
                ]
            )
            == 0
        )
    finally:
        os.chdir(cwd)
    return d


def train_args(d, param, epochs, **kw):
    args = [
        "train",
        "--param",
        param,
        "--labels",
        str(d / "p.star"),
        "--split",
        str(d / "split.csv"),
        "--arch",
        "resnet18",
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--workers",
        "0",
        "--out-dir",
        str(d / param),
    ]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_tiny_training_lowers_validation_loss(labelled, monkeypatch):
    monkeypatch.chdir(labelled)
    torch.manual_seed(0)
    assert cli(train_args(labelled, "shifts", 8, patience=20)) == 0
    hist = pd.read_csv(labelled / "shifts" / "history.csv")
    print(hist[["epoch", "train_loss", "val_loss", "val_metric"]].to_string(index=False))
    assert hist["val_loss"].min() < 0.6 * hist["val_loss"].iloc[0] or hist["val_loss"].min() < 0.5
    assert not (labelled / "shifts" / "checkpoint.pt").exists()
    meta = torch.load(labelled / "shifts" / "model.pt", weights_only=True)
    assert meta["param"] == "shifts" and meta["std"].shape == (2,)


def test_resume_after_kill(labelled, monkeypatch):
    monkeypatch.chdir(labelled)
    out = labelled / "amplitudes"
    assert cli(train_args(labelled, "amplitudes", 3, stop_after_epoch=2)) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not (out / "model.pt").exists()
    assert cli(train_args(labelled, "amplitudes", 3)) == 0
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3]  # epochs 1-2 from the checkpoint, 3 resumed
    # a run with other settings does not resume from a stale checkpoint
    assert cli(train_args(labelled, "amplitudes", 2, stop_after_epoch=1)) == 0
    assert cli(train_args(labelled, "amplitudes", 2, lr=1e-3)) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


def test_inference_one_row_per_image_and_merge(labelled, monkeypatch, tmp_path):
    monkeypatch.chdir(labelled)
    if not (labelled / "angles" / "model.pt").exists():
        assert cli(train_args(labelled, "angles", 1)) == 0
    for param in ("angles", "shifts", "amplitudes"):
        if not (labelled / param / "model.pt").exists():
            assert cli(train_args(labelled, param, 1)) == 0
        assert (
            cli(
                [
                    "infer",
                    "--network",
                    str(labelled / param / "model.pt"),
                    "--particles",
                    "p.star",
                    "--batch",
                    "48",
                    "--workers",
                    "0",
                    "--out",
                    str(tmp_path / f"{param}.star"),
                ]
            )
            == 0
        )
        t = starfile.read(tmp_path / f"{param}.star")["particles"]
        assert len(t) == 160 and t["rlnImageName"].is_unique
    assert (
        cli(
            [
                "merge",
                "--particles",
                "p.star",
                "--inferred",
                *[str(tmp_path / f"{p}.star") for p in ("angles", "shifts", "amplitudes")],
                "--out",
                str(tmp_path / "all.star"),
            ]
        )
        == 0
    )
    merged = ParticleSet(tmp_path / "all.star")
    angles = starfile.read(tmp_path / "angles.star")["particles"]
    np.testing.assert_allclose(
        merged.euler(), angles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    q = geometry.euler_to_quaternion(merged.euler())
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0)


def test_predict_matches_direct_forward(labelled, monkeypatch):
    monkeypatch.chdir(labelled)
    if not (labelled / "shifts" / "model.pt").exists():
        assert cli(train_args(labelled, "shifts", 1)) == 0
    net, meta = infer.load_network(str(labelled / "shifts" / "model.pt"), torch.device("cpu"))
    ps = ParticleSet(labelled / "p.star")
    streamed = infer.predict(net, meta, ps, torch.device("cpu"), 64, 0)
    bf16 = infer.bf16_supported(torch.device("cpu"))  # predict uses bf16 where the CPU has it
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        x = train.preprocess(torch.from_numpy(ps.images[np.arange(5)]))
        direct = net(x.contiguous(memory_format=torch.channels_last)).float()
    direct = direct * meta["std"] + meta["mean"]
    np.testing.assert_allclose(streamed[:5], direct.numpy(), rtol=1e-4, atol=1e-4)
