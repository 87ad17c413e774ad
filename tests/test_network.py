import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma import geometry, hemnma, infer, nets, quality, simulate, synthesize, train, views
from deephemnma.cli import main as cli
from deephemnma.flexible import FlexibleModel
from deephemnma.imaging import ctf as ctf_fn
from deephemnma.imaging import fourier_crop
from deephemnma.io import (
    EULER_COLUMNS,
    ParticleSet,
    candidate_columns,
    table_euler,
    table_shifts_px,
    write_star,
)
from deephemnma.nets import (
    ResNet,
    build_network,
    decode_angles,
    decode_regression,
    grid_targets,
    grid_uncertainty,
    n_outputs,
    n_parameters,
    preprocess,
    rotation_grid,
)
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
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
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
    params = simulate.draw_parameters(4, model.mode_numbers, cfg)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    render = lambda p: simulate.render(
        model.to(dtype=torch.float64),
        p,
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


def trainer(d, param, epochs, labels=None, out=None) -> train.Trainer:
    """The Trainer `train_args` would run, for tests that stop it early."""
    settings = train.TrainSettings(
        param=param, arch="resnet18", epochs=epochs, batch_size=16, lr=2e-3, workers=0
    )
    return train.Trainer(settings, labels or d / "p.star", d / "split.csv", out or d / param)


def test_tiny_training_lowers_validation_loss(labelled, monkeypatch):
    monkeypatch.chdir(labelled)
    torch.manual_seed(0)
    assert cli(train_args(labelled, "shifts", 8, patience=20)) == 0
    hist = pd.read_csv(labelled / "shifts" / "history.csv")
    print(hist[["epoch", "train_loss", "val_loss", "val_metric"]].to_string(index=False))
    assert hist["val_loss"].min() < 0.6 * hist["val_loss"].iloc[0] or hist["val_loss"].min() < 0.5
    assert not (labelled / "shifts" / "checkpoint.pt").exists()
    meta = torch.load(labelled / "shifts" / "network.pt", weights_only=True)
    assert meta["param"] == "shifts" and meta["std"].shape == (2,)


def test_resume_after_kill(labelled, monkeypatch):
    monkeypatch.chdir(labelled)
    out = labelled / "amplitudes"
    assert not trainer(labelled, "amplitudes", 3).fit(max_epochs=2)  # as if killed after 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not (out / "network.pt").exists()
    assert cli(train_args(labelled, "amplitudes", 3)) == 0
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3]  # epochs 1-2 from the checkpoint, 3 resumed
    # a run with other settings does not resume from a stale checkpoint
    assert not trainer(labelled, "amplitudes", 2).fit(max_epochs=1)
    assert cli(train_args(labelled, "amplitudes", 2, lr=1e-3)) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


def test_inference_one_row_per_image_and_merge(labelled, monkeypatch, tmp_path):
    monkeypatch.chdir(labelled)
    if not (labelled / "angles" / "network.pt").exists():
        assert cli(train_args(labelled, "angles", 1)) == 0
    for param in ("angles", "shifts", "amplitudes"):
        if not (labelled / param / "network.pt").exists():
            assert cli(train_args(labelled, param, 1)) == 0
        assert (
            cli(
                [
                    "infer",
                    "--network",
                    str(labelled / param / "network.pt"),
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
        col = f"dhUncertainty{param.capitalize()}"  # how sure the network is (shifts: on request)
        assert (col in t) == (param != "shifts")
        if col in t:
            assert np.isfinite(t[col]).all() and (t[col] > 0).all() and t[col].nunique() > 1
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
    # merge keeps every uncertainty; quality measures each one's calibration
    inferred = [str(tmp_path / f"{p}.star") for p in ("angles", "shifts", "amplitudes")]
    for p in ("angles", "amplitudes"):
        col = f"dhUncertainty{p.capitalize()}"
        own = starfile.read(tmp_path / f"{p}.star")["particles"][col]
        np.testing.assert_allclose(merged.particles[col], own, rtol=1e-5)
    q = ["quality", "--labels", "p.star", "--split", "split.csv", "--inferred", *inferred]
    q += ["--out-json", str(tmp_path / "q.json"), "--out-md", str(tmp_path / "q.md")]
    assert cli([*q, "--out-figure", str(tmp_path / "c.png")]) == 0
    rows = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))["networks"]
    assert [r["param"] for r in rows if "spearman" in r] == ["angles", "amplitudes"]
    assert all(-1 <= r["spearman"] <= 1 for r in rows if "spearman" in r)
    assert "amplitudes: the predicted per-image uncertainty" in (tmp_path / "q.md").read_text(
        encoding="utf-8"
    )


def test_angle_candidates_are_written_kept_by_merge_and_read_by_the_hybrid(
    labelled, monkeypatch, tmp_path, capsys
):
    monkeypatch.chdir(labelled)
    if not (labelled / "angles" / "network.pt").exists():
        assert cli(train_args(labelled, "angles", 1)) == 0
    net = str(labelled / "angles" / "network.pt")
    base = ["infer", "--network", net, "--particles", "p.star", "--workers", "0", "--out"]
    assert cli([*base, str(tmp_path / "one.star")]) == 0
    assert cli([*base, str(tmp_path / "a.star"), "--candidates", "3"]) == 0
    one = starfile.read(tmp_path / "one.star")["particles"]
    t = starfile.read(tmp_path / "a.star")["particles"]
    answer = t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    np.testing.assert_allclose(answer, one[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]])
    euler = [answer] + [t[candidate_columns(j)].to_numpy() for j in (2, 3)]
    for a in range(3):
        for b in range(a):  # each candidate more than 30° from those before it
            assert geometry.euler_distance_deg(euler[a], euler[b]).min() > 30.0 - 1e-3
    # merge keeps them on every row, HEMNMA-labelled ones included; the hybrid start reads them
    star = starfile.read(labelled / "p.star")
    hem = {"optics": star["optics"], "particles": star["particles"].iloc[:40]}
    starfile.write(hem, tmp_path / "hemnma.star", overwrite=True)
    merged = tmp_path / "merged.star"
    assert cli(["merge", "--particles", "p.star", "--inferred", str(tmp_path / "a.star"),
                "--labelled", str(tmp_path / "hemnma.star"), "--out", str(merged)]) == 0  # fmt: skip
    start = hemnma.read_start(ParticleSet(merged), "network", [7, 8, 9])
    np.testing.assert_allclose(start.candidates, np.stack(euler[1:], 1), atol=1e-3)
    np.testing.assert_allclose(
        start.euler[:40], star["particles"][EULER_COLUMNS].iloc[:40], atol=1e-3
    )
    # only so3grid angle networks have candidates
    capsys.readouterr()
    assert cli([*base, str(tmp_path / "b.star"), "--candidates", "0"]) == 2
    assert "--candidates 0 needs an so3grid angle network" in capsys.readouterr().err
    assert not (tmp_path / "b.star").exists()


def test_grid_candidates_start_at_the_answer_and_follow_the_distribution():
    grid = nets.rotation_grid()
    far = geometry.grid_angles(grid[:1], grid)[0] > math.radians(60)
    i, j = 0, int(torch.nonzero(far)[0])  # two grid rotations more than 60° apart
    logits = torch.zeros(1, nets.GRID_SIZE)
    logits[0, i], logits[0, j] = 9.0, 8.0
    cands = nets.grid_candidates(torch.log_softmax(logits, -1), grid[i : i + 1], 4)
    assert cands.shape == (1, 4, 3, 3)
    assert torch.allclose(cands[0, 0], grid[i]) and torch.allclose(cands[0, 1], grid[j])
    angles = geometry.grid_angles(cands[0], cands[0])
    assert (angles[~torch.eye(4, dtype=torch.bool)] > math.radians(30) - 1e-4).all()


def test_predict_matches_direct_forward(labelled, monkeypatch, tmp_path):
    """Streamed predictions of a shift network with a variance head (`--variance`) equal its
    direct forward pass: the shifts, then the RMS of the predicted standard deviations."""
    monkeypatch.chdir(labelled)
    args = train_args(labelled, "shifts", 1)
    args[args.index("--out-dir") + 1] = str(tmp_path)
    assert cli([*args, "--variance"]) == 0
    net, meta = infer.load_network(str(tmp_path / "network.pt"), torch.device("cpu"))
    ps = ParticleSet(labelled / "p.star")
    # the loaded network has its batch norms folded into the convolutions: same outputs in
    # float32; where the CPU computes in bf16 its weights are bf16: outputs within 3 %
    plain = build_network(meta["arch"], meta["n_out"]).eval()
    plain.load_state_dict(meta["state_dict"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x = preprocess(torch.from_numpy(ps.images[np.arange(5)]), meta["box"])
    with monkeypatch.context() as m:
        m.setattr(infer, "bf16_supported", lambda device: False)
        folded, _ = infer.load_network(str(tmp_path / "network.pt"), torch.device("cpu"))
    with torch.no_grad():
        want, direct = plain(x), infer.forward(net, x)
        np.testing.assert_allclose(folded(x).numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(direct.numpy() - want.numpy()).max() < 0.03 * want.abs().max().item()
    streamed = infer.predict(net, meta, ps, torch.device("cpu"), 64, 0, turns=1)
    assert meta["augment"]  # trained with quarter turns: inference may turn the images
    turned = infer.predict(net, meta, ps, torch.device("cpu"), 64, 0, turns=4)
    assert np.abs(turned[:, :2] - streamed[:, :2]).max() > 1e-3
    unturned = infer.predict(net, {**meta, "augment": False}, ps, torch.device("cpu"), 64, 0)
    np.testing.assert_array_equal(unturned, streamed)  # never saw turns: none at inference
    assert direct.shape == (5, 4)  # shifts and their log-variances (the variance head)
    np.testing.assert_allclose(
        streamed[:5, :2], (direct[:, :2] * meta["std"] + meta["mean"]).numpy(), rtol=1e-4, atol=1e-4
    )
    sd = torch.exp(0.5 * direct[:, 2:]) * meta["std"]  # pixels, per axis
    np.testing.assert_allclose(streamed[:5, 2], sd.norm(dim=1).numpy(), rtol=1e-3)


def test_fine_tuning_gets_its_own_warm_up_and_decay():
    """After pretraining the learning rate climbs again (to 0.3 of the peak) and decays to zero
    over the fine-tuning steps; without pretraining fine-tuning has the whole peak."""
    f = train.phased_schedule(1000, 100)
    pre = [f(s) for s in range(1000)]
    fine = [f(s) for s in range(1000, 1100)]
    assert max(pre) == pytest.approx(1.0) and pre[-1] < 1e-4
    assert max(fine) == pytest.approx(0.3) and fine[-1] < 1e-3 and fine[0] < fine[5]
    alone = [train.phased_schedule(0, 100)(s) for s in range(100)]
    assert max(alone) == pytest.approx(1.0)


def test_sixd_output_follows_the_relion_convention():
    """6D targets are the first two rows of RELION's matrix; outputs map back to the same Euler
    angles, noisy outputs to proper rotations, and the matrix angle equals the quaternion one."""
    rng = np.random.default_rng(1)
    euler = geometry.random_euler(200, rng)
    six = train.target_values("angles", "6d", torch.tensor(euler), None, None)
    back = geometry.matrix_to_euler(decode_angles(six, "6d")[0]).numpy()
    assert geometry.euler_distance_deg(back, euler).max() < 1e-4
    mats = geometry.euler_to_matrix(torch.tensor(euler))
    np.testing.assert_allclose(six.reshape(-1, 2, 3).numpy(), mats[:, :2].numpy(), atol=1e-12)
    noisy = geometry.sixd_to_matrix(six * 3 + 0.2 * torch.randn(six.shape, dtype=six.dtype))
    eye = torch.eye(3, dtype=noisy.dtype).expand_as(noisy)
    torch.testing.assert_close(noisy @ noisy.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(noisy), torch.ones(200, dtype=noisy.dtype))
    other = geometry.random_euler(200, rng)
    np.testing.assert_allclose(
        geometry.matrix_distance_deg(mats.numpy(), geometry.euler_to_matrix(other)),
        geometry.euler_distance_deg(euler, other),
        atol=1e-5,
    )


def test_so3grid_output_follows_the_relion_convention():
    """so3grid: the grid covers SO(3) evenly; the soft target of a rotation given as RELION Euler
    angles decodes back to the same angles; a flat score says "unsure" (its uncertainty is the
    share of SO(3) farther than 20° from the answer), a sharper one says "sure"."""
    grid = rotation_grid().double()
    gaps = torch.rad2deg(geometry.grid_angles(grid[:600], grid))
    gaps[torch.arange(600), torch.arange(600)] = 180.0
    nearest = gaps.min(1).values
    assert 10.0 < nearest.mean() < 15.0 and nearest.max() < 20.0
    rng = np.random.default_rng(2)
    euler = geometry.random_euler(300, rng)
    mats = geometry.euler_to_matrix(torch.tensor(euler))
    target = train.target_values("angles", "so3grid", torch.tensor(euler), None, None)
    scores = torch.log(grid_targets(geometry.sixd_to_matrix(target)))
    rot, spread = decode_angles(scores, "so3grid")
    back = geometry.matrix_to_euler(rot.double()).numpy()
    assert geometry.euler_distance_deg(back, euler).max() < 3.0
    assert geometry.matrix_distance_deg(rot.double(), mats).mean() < 1.5
    _, flat = decode_angles(torch.zeros(1, scores.shape[1]), "so3grid")
    _, sharp = decode_angles(4 * scores, "so3grid")  # the soft target to the 4th power: σ 7.5°
    # uncertainty: the mass farther than 20° from the answer: about 0.5-0.75 for the soft target
    # (15°), less for a sharper one, and for a flat score the share of SO(3) beyond 20°,
    # 1 - (θ - sin θ)/π
    assert 0.45 < spread.min() and spread.max() < 0.8 and sharp.max() < 0.2
    assert flat.item() == pytest.approx(
        1 - (np.radians(20) - np.sin(np.radians(20))) / np.pi, abs=2e-3
    )


def test_so3grid_uncertainty_counts_disagreement_between_turned_images():
    """Scores of the image turned by 90° k that agree with the answer (psi + 90° k, as
    train.transform_labels turns the labels) keep the single image's uncertainty; scores that
    disagree (the opposite turn) raise it."""
    euler = torch.tensor(geometry.random_euler(100, np.random.default_rng(4)))

    def scores(turn_deg: float) -> torch.Tensor:
        e, _ = train.transform_labels(euler, torch.zeros(100, 2), torch.full((100,), turn_deg), 0)
        return 4 * torch.log(grid_targets(geometry.euler_to_matrix(e).float()))

    rot, single = decode_angles(scores(0.0), "so3grid")
    agree = grid_uncertainty([scores(90.0 * k) for k in range(4)], rot)
    disagree = grid_uncertainty([scores(-90.0 * k) for k in range(4)], rot)
    assert (agree - single).abs().max() < 0.1 and single.max() < 0.2
    assert (disagree - single).min() > 0.3  # two of the four turns point 180° away


def test_pretraining_images_match_particles(adk_model_files, tmp_path, monkeypatch):
    """Synthetic images rendered with the particles' own parameters have their power spectrum
    (CTF and noise) once the signal scale and noise are fitted; the noise level is recovered."""
    monkeypatch.chdir(tmp_path)
    argv = ["simulate", "--model", str(adk_model_files / "model.npz")]
    argv += ["--modes", str(adk_model_files / "modes.npz"), "--n-images", "400", "--box", "64"]
    argv += ["--pixel-size", "2.2", "--snr", "0.1", "--defocus", "4000", "9000"]
    assert cli([*argv, "--out-star", "p.star", "--out-stacks", "s"]) == 0
    ps = ParticleSet("p.star")
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz").to()
    box = 32
    renderer = synthesize.FlexibleRenderer(model, ps, box, 1.0)
    params = ps.particles.assign(row=np.arange(len(ps)))
    clean = renderer.render(params)
    real = fourier_crop(torch.from_numpy(ps.images[np.arange(len(ps))]), box)
    fit = synthesize.fit_noise(real, clean)
    # the simulator's noise has unit variance at 64 px: sigma (32 / 64) after the crop
    assert fit.noise_sigma == pytest.approx(0.5, rel=0.05)
    g = torch.Generator().manual_seed(0)
    noisy = np.sqrt(fit.signal_scale) * clean + fit.noise_sigma * torch.randn(
        clean.shape, generator=g
    )
    shells = slice(1, box // 2)  # the fitted shells (the corner shell at Nyquist is sparse)
    p_real, p_syn = synthesize.radial_power(real)[shells], synthesize.radial_power(noisy)[shells]
    print("power ratio per shell:", np.round(p_syn / p_real, 3))
    assert np.abs(p_syn / p_real - 1).max() < 0.08
    # same poses and CTFs: the fitted synthetic signal correlates with each particle's
    corr = ((real - real.mean()) * clean).sum((1, 2)) / (real.std() * clean.std() * box * box)
    assert float(corr.mean()) > 0.1
    # a wrong CTF (defocus doubled) no longer fits
    ps.table["rlnDefocusU"] *= 2
    ps.table["rlnDefocusV"] *= 2
    wrong = synthesize.FlexibleRenderer(model, ps, box, 1.0).render(params)
    fit_w = synthesize.fit_noise(real, wrong)
    noisy_w = np.sqrt(fit_w.signal_scale) * wrong + fit_w.noise_sigma * torch.randn(
        clean.shape, generator=g
    )
    assert np.abs(synthesize.radial_power(noisy_w)[shells] / p_real - 1).max() > 0.15


def test_easy_task_learns(adk_model_files, tmp_path, monkeypatch):
    """Noise-free images at a fixed pose: the amplitude network gets well below its baseline."""
    monkeypatch.chdir(tmp_path)
    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    cfg = sim_config(box=32, pixel_size=4.4, ctf=False, snr=None, seed=2)
    params = simulate.draw_parameters(600, model.mode_numbers, cfg)
    params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = [30.0, 60.0, 0.0]
    params[["rlnOriginXAngst", "rlnOriginYAngst"]] = 0.0
    out = simulate.render(model.to(), params, cfg, None)
    net, base, err = train_in_memory(out["final"], params, model.mode_numbers, 12, cosine=True)
    print(f"easy task: error {err:.1f}, baseline {base:.1f}")
    assert err < 0.3 * base


def train_in_memory(
    images, params, mode_numbers, epochs, shuffle=False, arch="resnet18", views=None, cosine=False
):
    """Train an amplitude network on images (n, D, D) (and `views` (n, C, D, D) as more
    channels) without augmentation, optionally with a warm-up + cosine schedule; (net, baseline,
    error) on the last fifth of the images."""
    torch.manual_seed(0)
    amps = torch.tensor(params[[f"dhAmplitudeMode{k}" for k in mode_numbers]].to_numpy()).float()
    n_train = len(images) * 4 // 5
    y = amps[torch.randperm(len(amps))] if shuffle else amps
    mean, std = y[:n_train].mean(0), y[:n_train].std(0)
    x = preprocess(images, images.shape[-1])
    if views is not None:
        x = torch.cat([x, views.float()], 1)
    net = build_network(arch, len(mode_numbers), x.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    steps = epochs * -(-n_train // 32)
    factor = train.warmup_cosine(steps) if cosine else lambda step: 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for _ in range(epochs):
        net.train()
        for i in torch.randperm(n_train).split(32):
            loss = torch.nn.functional.mse_loss(net(x[i]), (y[i] - mean) / std)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = net(x[n_train:]) * std + mean
    err = float((pred - amps[n_train:]).abs().mean())
    base = float((mean - amps[n_train:]).abs().mean())
    return net, base, err


def test_quality_verdict_flags_shuffled_labels_and_merge_falls_back(
    labelled, monkeypatch, tmp_path
):
    """A network trained on shuffled labels is not trusted; merge then takes HEMNMA's values
    for labelled images and marks the others untrusted; space leaves those out."""
    monkeypatch.chdir(labelled)
    star = starfile.read(labelled / "p.star")
    parts = star["particles"]
    rng = np.random.default_rng(0)
    for k in (7, 8, 9):
        parts[f"dhAmplitudeMode{k}"] = rng.permutation(parts[f"dhAmplitudeMode{k}"].to_numpy())
    starfile.write(star, labelled / "shuffled.star", overwrite=True)
    args = train_args(labelled, "amplitudes", 2)
    args[args.index("--labels") + 1] = str(labelled / "shuffled.star")
    args[args.index("--out-dir") + 1] = str(tmp_path / "net")
    assert cli(args) == 0
    inferred = tmp_path / "amplitudes.star"
    assert cli(["infer", "--network", str(tmp_path / "net" / "network.pt"), "--particles", "p.star",
                "--workers", "0", "--out", str(inferred)]) == 0  # fmt: skip
    q = ["quality", "--labels", str(labelled / "shuffled.star"), "--split", "split.csv"]
    q += ["--inferred", str(inferred), "--out-json", str(tmp_path / "q.json")]
    assert (
        cli([*q, "--out-md", str(tmp_path / "q.md"), "--out-figure", str(tmp_path / "c.png")]) == 0
    )
    verdict = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))["networks"][0]
    print(verdict["text"])
    assert verdict["param"] == "amplitudes" and not verdict["trusted"]
    assert verdict["ratio"] > 0.8 and "NOT" in (tmp_path / "q.md").read_text(encoding="utf-8")
    # the first 40 images stand for HEMNMA's labelled subset
    hemnma = {"optics": star["optics"], "particles": star["particles"].iloc[:40]}
    starfile.write(hemnma, tmp_path / "hemnma.star", overwrite=True)
    out = tmp_path / "merged.star"
    assert cli(["merge", "--particles", "p.star", "--inferred", str(inferred), "--labelled",
                str(tmp_path / "hemnma.star"), "--quality", str(tmp_path / "q.json"),
                "--out", str(out)]) == 0  # fmt: skip
    merged = starfile.read(out)["particles"]
    assert merged["dhTrusted"].tolist() == [1] * 40 + [0] * 120
    assert (merged["dhSourceAmplitudes"].iloc[:40] == "hemnma").all()
    np.testing.assert_allclose(merged["dhAmplitudeMode7"].iloc[:40], parts["dhAmplitudeMode7"][:40])
    pred = starfile.read(inferred)["particles"]["dhAmplitudeMode7"]
    np.testing.assert_allclose(merged["dhAmplitudeMode7"].iloc[40:], pred.iloc[40:], rtol=1e-5)
    assert (merged["dhSourceAmplitudes"].iloc[40:] == "network").all()
    # a trusted network: HEMNMA's values still win where they exist, and every image is trusted
    (tmp_path / "q.json").write_text(
        json.dumps({"networks": [{**verdict, "trusted": True}]}), encoding="utf-8"
    )
    assert cli(["merge", "--particles", "p.star", "--inferred", str(inferred), "--labelled",
                str(tmp_path / "hemnma.star"), "--quality", str(tmp_path / "q.json"),
                "--out", str(out)]) == 0  # fmt: skip
    merged = starfile.read(out)["particles"]
    assert merged["dhTrusted"].all() and (merged["dhSourceAmplitudes"].iloc[:40] == "hemnma").all()


def test_quality_measures_uncertainty_calibration(labelled, monkeypatch, tmp_path):
    """An angle uncertainty that ranks the true errors exactly gets Spearman 1; the verdict page
    says so and the calibration figure is written."""
    monkeypatch.chdir(labelled)
    ps = ParticleSet(labelled / "p.star")
    t = ps.particles[["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].copy()
    dpsi = np.random.default_rng(3).uniform(0.0, 40.0, len(t))
    t["rlnAnglePsi"] = t["rlnAnglePsi"] + dpsi  # a turn about the beam: angle error = dpsi
    t["dhUncertaintyAngles"] = np.sqrt(dpsi)
    write_star(tmp_path / "angles.star", ps.optics, t)
    q = ["quality", "--labels", "p.star", "--split", "split.csv"]
    q += ["--inferred", str(tmp_path / "angles.star"), "--out-json", str(tmp_path / "q.json")]
    assert (
        cli([*q, "--out-md", str(tmp_path / "q.md"), "--out-figure", str(tmp_path / "c.png")]) == 0
    )
    row = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))["networks"][0]
    assert row["spearman"] == pytest.approx(1.0)
    assert abs(row["error"] - dpsi[ps.particles.index[split_test(labelled)]].mean()) < 1e-3
    assert "Spearman ρ = 1.00" in (tmp_path / "q.md").read_text(encoding="utf-8")
    assert (tmp_path / "c.png").stat().st_size > 0
    # a shift drift (written with the amplitudes' agreement) that ranks the shifts' errors
    # exactly; shift errors are |dx| here (pixels)
    s = ps.particles[["rlnImageName", "rlnOriginXAngst", "rlnOriginYAngst"]].copy()
    dx = np.random.default_rng(4).uniform(0.0, 2.0, len(s))
    s["rlnOriginXAngst"] = s["rlnOriginXAngst"] - dx * ps.pixel_size
    write_star(tmp_path / "shifts.star", ps.optics, s)
    a = ps.particles[["rlnImageName", "dhAmplitudeMode7"]].assign(dhModelShiftDrift=dx**2)
    write_star(tmp_path / "amplitudes.star", ps.optics, a)
    q[q.index("--inferred") + 1] = str(tmp_path / "shifts.star")
    q.insert(q.index("--out-json"), str(tmp_path / "amplitudes.star"))
    assert (
        cli([*q, "--out-md", str(tmp_path / "q.md"), "--out-figure", str(tmp_path / "c.png")]) == 0
    )
    row = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))["networks"][0]
    assert row["param"] == "shifts" and row["drift_spearman"] == pytest.approx(1.0)
    assert "_dhModelShiftDrift`) ranks the actual errors with Spearman ρ = 1.00" in (
        tmp_path / "q.md"
    ).read_text(encoding="utf-8")


def split_test(d) -> np.ndarray:
    """Boolean mask of the test images of the fixture's split, in particle order."""
    split = pd.read_csv(d / "split.csv").set_index("rlnImageName")
    names = ParticleSet(d / "p.star").particles["rlnImageName"]
    return (split.loc[names, "set"] == "test").to_numpy()


def test_quality_baselines_match_independent_formulas():
    """Constant answers: amplitudes uniform in ±150 give a mean |error| of 75; orientations
    uniform on SO(3) give a mean angle of about 126.5° from any constant rotation."""
    rng = np.random.default_rng(0)
    n = 20000
    labels = lambda: {
        "euler": geometry.random_euler(n, rng),
        "shifts": rng.uniform(-5, 5, (n, 2)),
        "amplitudes": rng.uniform(-150, 150, (n, 3)),
    }
    train_l, test_l = labels(), labels()
    base = quality.baseline(train_l, n)
    assert quality.errors("amplitudes", base, test_l).mean() == pytest.approx(75, rel=0.02)
    # E|angle| for uniform rotations: (pi/2 + 2/pi) rad
    expected = np.degrees(np.pi / 2 + 2 / np.pi)
    assert quality.errors("angles", base, test_l).mean() == pytest.approx(expected, rel=0.01)
    # mean distance to the centre of a 10 x 10 px square: 3.826 px
    assert quality.errors("shifts", base, test_l).mean() == pytest.approx(3.826, rel=0.02)
    assert quality.verdict("shifts", 1.0, 3.8, 0.5, "truth")["trusted"]
    assert not quality.verdict("shifts", 2.0, 3.8, 0.5, "truth")["trusted"]


def test_changed_labels_do_not_resume_a_checkpoint(labelled, monkeypatch, tmp_path):
    """The checkpoint fingerprint holds the labels' content, not their file name."""
    monkeypatch.chdir(labelled)
    star = starfile.read(labelled / "p.star")
    starfile.write(star, tmp_path / "labels.star", overwrite=True)
    args = train_args(labelled, "shifts", 3)
    args[args.index("--labels") + 1] = str(tmp_path / "labels.star")
    args[args.index("--out-dir") + 1] = str(tmp_path / "net")
    job = trainer(labelled, "shifts", 3, labels=tmp_path / "labels.star", out=tmp_path / "net")
    assert not job.fit(max_epochs=2)  # as if killed after epoch 2
    killed = torch.load(tmp_path / "net" / "checkpoint.pt", weights_only=True)["history"]
    star["particles"]["rlnOriginXAngst"] += 4.4  # same file, new labels (a rerun of HEMNMA)
    starfile.write(star, tmp_path / "labels.star", overwrite=True)
    assert cli(args) == 0
    hist = pd.read_csv(tmp_path / "net" / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3]
    assert abs(hist["val_metric"].iloc[0] - killed[0]["val_metric"]) > 1e-3  # epoch 1 redone
    assert torch.load(tmp_path / "net" / "network.pt", weights_only=True)["val_baseline"] > 0


def test_infer_refuses_other_geometry_and_foreign_pickles(labelled, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(labelled)
    if not (labelled / "shifts" / "network.pt").exists():
        assert cli(train_args(labelled, "shifts", 1)) == 0
    star = starfile.read(labelled / "p.star")
    star["optics"]["rlnImagePixelSize"] = 2.2  # same box, half the field of view
    starfile.write(star, tmp_path / "other.star", overwrite=True)
    for stack in {n.split("@")[1] for n in star["particles"]["rlnImageName"]}:
        (tmp_path / stack).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stack).write_bytes((labelled / stack).read_bytes())
    base = ["infer", "--workers", "0", "--out", str(tmp_path / "o.star")]
    monkeypatch.chdir(tmp_path)
    net = str(labelled / "shifts" / "network.pt")
    assert cli([*base, "--network", net, "--particles", "other.star"]) == 2
    assert "32 px at 2.2 Å/px, but" in capsys.readouterr().err
    assert not (tmp_path / "o.star").exists()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > owned.txt",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert cli([*base, "--network", str(tmp_path / "evil.pt"), "--particles", "other.star"]) == 2
    assert not (tmp_path / "owned.txt").exists()
    assert "refusing to load (not a DeepHEMNMA network)" in capsys.readouterr().err


def test_synthesize_then_pretrain_and_finetune(labelled, adk_model_files, monkeypatch, tmp_path):
    """synthesize recovers the simulator's unit noise; train runs a pretraining epoch on the
    synthetic images, then fine-tunes on the labelled ones, and records both phases."""
    monkeypatch.chdir(labelled)
    syn = tmp_path / "syn"
    argv = ["synthesize", "--model", str(adk_model_files / "model.npz")]
    argv += ["--modes", str(adk_model_files / "modes.npz"), "--particles", "p.star"]
    argv += ["--labels", "p.star", "--n-images", "96", "--out-dir", str(syn)]
    assert cli([*argv, "--out-figure", str(tmp_path / "syn.png")]) == 0
    meta = json.loads((syn / "meta.json").read_text(encoding="utf-8"))
    assert meta["noise_sigma"] == pytest.approx(1.0, rel=0.1) and meta["box"] == 32
    assert np.load(syn / "images.npy").shape == (96, 32, 32)
    labels = np.load(syn / "labels.npz")
    assert np.abs(labels["shifts"]).max() <= 2.0 + 1e-6  # within the labelled range
    args = train_args(labelled, "shifts", 1)
    args[args.index("--out-dir") + 1] = str(tmp_path / "net")
    assert cli([*args, "--pretrain", str(syn), "--pretrain-epochs", "1"]) == 0
    hist = pd.read_csv(tmp_path / "net" / "history.csv")
    assert hist["phase"].tolist() == ["pretrain", "finetune"]


def test_views_match_the_atom_projector_and_follow_augmentation(adk_model_files):
    """The reference's views (central slices of densities) agree with the simulator's Gaussian
    projector, mode steps included, with shifts and CTF; and moving views as the augmentation
    moves images gives the views at the moved labels."""
    flex = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    steps = np.array([80.0, -60.0, 100.0])
    mv = views.ModeViews.from_model(flex, steps, 32, 4.4)
    cfg = sim_config(box=32, pixel_size=4.4, seed=3, snr=None)
    params = simulate.draw_parameters(6, flex.mode_numbers, cfg)
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    direct = []
    for k in range(4):
        p = params.copy()
        for j, mode in enumerate(flex.mode_numbers):
            p[f"dhAmplitudeMode{mode}"] = steps[j] if j == k - 1 else 0.0
        direct.append(simulate.render(flex.to(), p, cfg, None)["ctf"])
    direct = torch.stack([direct[0]] + [d - direct[0] for d in direct[1:]], 1)
    euler = torch.tensor(table_euler(params))
    shifts = torch.tensor(table_shifts_px(params, 4.4))
    c = ctf_fn(
        t(params["rlnDefocusU"].to_numpy()), t(params["rlnDefocusV"].to_numpy()),
        t(params["rlnDefocusAngle"].to_numpy()), cfg.voltage_kv, cfg.cs_mm,
        cfg.amplitude_contrast, 4.4, 32, bfactor=cfg.bfactor,
    )  # fmt: skip
    got = mv.render(euler, shifts, c)
    corr = lambda a, b: float(np.corrcoef(a.flatten(), b.flatten())[0, 1])
    for i in range(6):
        assert corr(got[i, 0], direct[i, 0]) > 0.99
        assert min(corr(got[i, k], direct[i, k]) for k in (1, 2, 3)) > 0.9
    # augmentation: quarter turns and shifts of the views = views at the moved labels
    turns = torch.tensor([0, 1, 2, 3, 1, 3])
    tpx = torch.tensor([[0, 0], [1, -2], [2, 1], [-1, 0], [0, 2], [-2, -1]]).float()
    e2, s2 = train.transform_labels(euler, shifts, 90.0 * turns.float(), tpx)
    again = mv.render(e2, s2, None)
    plain = views.transform_views(mv.render(euler, shifts, None), turns, tpx)
    for i in range(6):
        assert corr(plain[i, 0], again[i, 0]) > 0.999


def test_agreement_is_highest_at_the_true_answer(labelled, adk_model_files, monkeypatch):
    """An image's agreement with the model at its true pose and amplitudes beats that at a pose
    off by 10°, which beats 40°; wrong amplitudes lower it too (160 images, SNR 1)."""
    monkeypatch.chdir(labelled)
    ps = ParticleSet("p.star")
    flex = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    euler, shifts, amps = ps.euler(), ps.shifts_px(), ps.amplitudes(flex.mode_numbers)
    cpu = torch.device("cpu")
    at = lambda e, a: infer.check_answers(ps, flex, (e, shifts), a, 32, cpu).agreement
    true = at(euler, amps)
    off = [at(views.perturb_poses(euler, shifts, deg, 0.0, seed=1)[0], amps) for deg in (10, 40)]
    assert np.mean(off[0] < true) > 0.9 and off[1].mean() < off[0].mean() < true.mean()
    assert np.mean(at(euler, amps + 150.0) < true) > 0.9


def test_model_drift_finds_wrong_shifts_and_amplitudes(labelled, adk_model_files, monkeypatch):
    """A short local refinement from the true answer barely moves it; from shifts 2 px off it
    moves them back most of the way, from amplitudes 60 off (each mode, random sign) too
    (160 images, SNR 1, working box 32)."""
    monkeypatch.chdir(labelled)
    ps = ParticleSet("p.star")
    flex = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    euler, shifts, amps = ps.euler(), ps.shifts_px(), ps.amplitudes(flex.mode_numbers)

    def drift(s, a):
        c = infer.check_answers(ps, flex, (euler, s), a, 32, torch.device("cpu"))
        return c.shift_drift, c.amplitude_drift

    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, len(ps))
    true = drift(shifts, amps)
    shift_off = drift(shifts + 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1), amps)
    amp_off = drift(shifts, amps + 60.0 * rng.choice([-1.0, 1.0], amps.shape))
    print(
        f"median shift drift: true {np.median(true[0]):.2f} px, 2 px off "
        f"{np.median(shift_off[0]):.2f} px; amplitude drift: true {np.median(true[1]):.1f}, "
        f"60 off {np.median(amp_off[1]):.1f}"
    )
    assert np.median(true[0]) < 0.5 and 1.0 < np.median(shift_off[0]) < 2.5
    assert np.mean(shift_off[0] > true[0]) > 0.9
    assert np.median(true[1]) < 25 and 40 < np.median(amp_off[1]) < 80
    assert np.mean(amp_off[1] > true[1]) > 0.9


def test_view_noise_is_half_normal():
    """Perturbed poses: rotation angles |N(0, σ)| (mean σ √(2/π)), shifts N(0, σ_px)."""
    rng = np.random.default_rng(0)
    euler = geometry.random_euler(4000, rng)
    shifts = rng.uniform(-2, 2, (4000, 2))
    e2, s2 = views.perturb_poses(euler, shifts, 10.0, 0.5, seed=1)
    ang = geometry.euler_distance_deg(euler, e2)
    assert ang.mean() == pytest.approx(10.0 * np.sqrt(2 / np.pi), rel=0.05)
    assert (s2 - shifts).std() == pytest.approx(0.5, rel=0.05)


def test_views_make_amplitudes_learnable(adk_model_files):
    """Noise-free images over all of SO(3): an amplitude network that also sees the views at
    the (10°-perturbed) pose beats the same network on images alone, and its baseline."""
    flex = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    cfg = sim_config(box=32, pixel_size=4.4, ctf=False, snr=None, seed=4)
    n = 2000
    params = simulate.draw_parameters(n, flex.mode_numbers, cfg)
    images = simulate.render(flex.to(), params, cfg, None)["clean"]
    amps = params[[f"dhAmplitudeMode{k}" for k in flex.mode_numbers]].to_numpy()
    mv = views.ModeViews.from_model(flex, amps.std(0), 32, 4.4)
    e, s = views.perturb_poses(table_euler(params), table_shifts_px(params, 4.4), 10.0, 0.3, 0)
    v = mv.render(torch.tensor(e), torch.tensor(s), None)
    errs = {}
    for name, extra in (("image", None), ("views", v)):
        _, base, errs[name] = train_in_memory(
            images, params, flex.mode_numbers, 8, arch="convnet16", views=extra, cosine=True
        )
    print(f"amplitudes: image {errs['image']:.1f}, views {errs['views']:.1f}, baseline {base:.1f}")
    assert errs["views"] < 0.8 * base  # measured: 0.65-0.68 x (images alone: 0.88 x)
    assert errs["views"] < 0.9 * errs["image"]


def test_amplitudes_with_views_train_and_need_poses_to_infer(
    labelled, adk_model_files, monkeypatch, tmp_path, capsys
):
    """train --views records the views in the network; infer refuses to run it without the
    images' poses, and with them writes one amplitude row per image."""
    monkeypatch.chdir(labelled)
    args = train_args(labelled, "amplitudes", 1, arch="convnet16")
    args[args.index("--out-dir") + 1] = str(tmp_path / "net")
    flexible = ["--model", str(adk_model_files / "model.npz")]
    flexible += ["--modes", str(adk_model_files / "modes.npz")]
    assert cli([*args, "--views"]) == 2  # views without the model
    assert "need the model and its modes" in capsys.readouterr().err
    assert cli([*args, "--views", *flexible]) == 0
    meta = torch.load(tmp_path / "net" / "network.pt", weights_only=True)
    k = FlexibleModel.from_modes(adk_model_files / "modes.npz").n_modes
    assert meta["in_channels"] == k + 2 and meta["views"]["volumes"].shape == (k + 1, 32, 32, 32)
    base = ["infer", "--network", str(tmp_path / "net" / "network.pt"), "--particles", "p.star"]
    base += ["--workers", "0", "--out", str(tmp_path / "a.star")]
    assert cli(base) == 2
    assert "give the images' poses (--poses)" in capsys.readouterr().err
    assert not (tmp_path / "a.star").exists()
    assert cli([*base, "--poses", "p.star", *flexible]) == 0
    t = starfile.read(tmp_path / "a.star")["particles"]
    assert len(t) == 160 and np.isfinite(t["dhAmplitudeMode7"]).all()
    # with views, each image's agreement with the model at the answer (a correlation)
    assert t["dhModelAgreement"].between(-1, 1).all() and t["dhModelAgreement"].nunique() > 1
    for c in ("dhModelShiftDrift", "dhModelAmplitudeDrift"):
        assert (t[c] >= 0).all() and t[c].nunique() > 1
    q = ["quality", "--labels", "p.star", "--split", "split.csv", "--inferred"]
    q += [str(tmp_path / "a.star"), "--out-json", str(tmp_path / "q.json")]
    q += ["--out-md", str(tmp_path / "q.md"), "--out-figure", str(tmp_path / "c.png")]
    assert cli(q) == 0
    row = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))["networks"][0]
    assert -1 <= row["agreement_spearman"] <= 1
    assert "disagreement with the model" in (tmp_path / "q.md").read_text(encoding="utf-8")


def test_quarter_turn_test_time_augmentation_maps_rotations_back():
    """A turned image's rotation Rz(90° k)·R (`transform_labels`) lands, through the k-th map, on
    a grid point next to R (two nearest-point roundings); and a scorer that is certain of each turned copy's own rotation gives
    back R, within the grid's spacing, after the four turns are averaged."""
    from deephemnma.nets import _quarter_turn_maps, quarter_turn_mean

    grid = rotation_grid()
    maps = _quarter_turn_maps()
    euler = torch.tensor(geometry.random_euler(50, np.random.default_rng(0)))
    rot = geometry.euler_to_matrix(euler).float()
    nearest = lambda r: geometry.grid_angles(r, grid).argmin(-1)
    angle = lambda a, b: torch.rad2deg(torch.arccos(((a * b).sum((-2, -1)) - 1).clamp(-2, 2) / 2))
    zero = torch.zeros(50, 2, dtype=euler.dtype)
    turned_rot = []
    for k in range(4):
        e2, _ = train.transform_labels(euler, zero, torch.full((50,), 90.0 * k), 0)
        turned_rot.append(geometry.euler_to_matrix(e2).float())
        assert angle(grid[maps[k][nearest(turned_rot[k])]], rot).max() < 25.0  # two roundings

    img = torch.zeros(50, 1, 8, 8)
    img[:, 0, 1, 2] = 1.0  # asymmetric: each quarter turn moves the pixel elsewhere
    turned_imgs = [
        train.transform_images(img[:, 0], torch.full((50,), k), torch.zeros(50, 2))
        for k in range(4)
    ]

    class Certain(torch.nn.Module):
        """All mass on the grid point nearest the rotation of the turned copy it is shown."""

        def forward(self, x):
            k = min(range(4), key=lambda q: float((turned_imgs[q] - x[:, 0]).abs().sum()))
            logits = torch.full((len(x), len(grid)), -30.0)
            logits[torch.arange(len(x)), nearest(turned_rot[k])] = 30.0
            return logits

    scores = [Certain()(turned[:, None]) for turned in turned_imgs]
    back, _ = decode_angles(quarter_turn_mean(scores), "so3grid")
    assert angle(back, rot).max() < 12.0


def test_variance_head_ranks_the_noisier_images_as_less_certain():
    """Shifts of a blob in images of two noise levels: the variance head predicts the larger
    uncertainty for the noisier images, and ranks the actual errors on held-out images."""
    torch.manual_seed(0)
    n, d = 1200, 16
    rng = np.random.default_rng(5)
    shifts = torch.tensor(rng.uniform(-2.5, 2.5, (n, 2))).float()
    c = torch.arange(d) - d // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    blob = torch.exp(
        -((xx - shifts[:, 0, None, None]) ** 2 + (yy - shifts[:, 1, None, None]) ** 2) / 8.0
    )
    noisy = torch.tensor(rng.random(n) < 0.5)
    sigma = torch.where(noisy, 0.6, 0.05)
    images = blob + sigma[:, None, None] * torch.randn(n, d, d)
    x = preprocess(images, d)
    mean, std = shifts[:1000].mean(0), shifts[:1000].std(0)
    net = build_network("convnet16", n_outputs("shifts", "so3grid", 0, variance=True))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    epochs = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.warmup_cosine(epochs * 32))
    for _ in range(epochs):
        net.train()
        for i in torch.randperm(1000).split(32):
            loss = train.batch_loss("shifts", "so3grid", net(x[i]), shifts[i], mean, std)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        value, sd = decode_regression(net(x[1000:]), mean, std)
    unc = infer.uncertainty("shifts", sd, 200, "cpu").numpy()
    err = (value - shifts[1000:]).norm(dim=1).numpy()
    held = noisy[1000:].numpy()
    rho = quality.calibration(unc, err)
    print(f"error {err[~held].mean():.2f} / {err[held].mean():.2f} px, predicted "
          f"{unc[~held].mean():.2f} / {unc[held].mean():.2f} px (clean / noisy); Spearman {rho:.2f}")  # fmt: skip
    assert err[held].mean() > 1.5 * err[~held].mean()  # the task: noise costs accuracy
    assert np.median(unc[held]) > 1.5 * np.median(unc[~held])
    assert rho > 0.3


def test_flagged_images_are_left_out_of_labels_merge_trust_and_space(
    labelled, monkeypatch, tmp_path
):
    """Images HEMNMA's quality flag marks are in no split set, do not widen the synthetic prior,
    are untrusted after merge and left out of the space; the gather verdict says so."""
    from deephemnma.gather import flag_verdict
    from deephemnma.io import ParticleSet
    from deephemnma.space import trusted_rows

    monkeypatch.chdir(labelled)
    star = starfile.read(labelled / "p.star")
    parts = star["particles"].iloc[:40].copy()
    parts["dhFlagged"] = [1] * 5 + [0] * 35
    parts.loc[parts.index[:5], "dhAmplitudeMode7"] = 900.0  # a flagged image's wrong label
    starfile.write({"optics": star["optics"], "particles": parts}, "flagged.star", overwrite=True)
    split = tmp_path / "split.csv"
    assert cli(["split", "--labels", "flagged.star", "--n-val", "5", "--n-test", "5",
                "--out", str(split)]) == 0  # fmt: skip
    sets = pd.read_csv(split)["set"].tolist()
    assert sets[:5] == ["flagged"] * 5
    assert sorted(sets[5:]).count("train") == 25 and sets[5:].count("test") == 5
    prior = synthesize.Prior.from_labels(ParticleSet("flagged.star"))
    assert prior.amplitude_high[0] == pytest.approx(parts["dhAmplitudeMode7"].iloc[5:].max())
    inferred = tmp_path / "amplitudes.star"
    cols = ["rlnImageName", "dhAmplitudeMode7", "dhAmplitudeMode8", "dhAmplitudeMode9"]
    answers = star["particles"][cols].copy()
    # the model at the networks' answers: typical agreement, but far lower for the last 10; the
    # flagged images' (0) and the training images' (0.9) are not the baseline: only val and test
    agreement = 0.5 + 0.01 * np.sin(np.arange(160))
    agreement[:5], agreement[5:15], agreement[150:] = 0.0, 0.9, 0.3
    answers["dhModelAgreement"] = agreement
    drift = np.linspace(0.0, 3.0, 160)  # the drifts are kept as inferred, HEMNMA's rows too
    answers["dhModelShiftDrift"], answers["dhModelAmplitudeDrift"] = drift, 10 * drift
    starfile.write({"optics": star["optics"], "particles": answers}, inferred)
    sets = ["flagged"] * 5 + ["train"] * 10 + ["val", "test"] * 12 + ["val"]
    pd.DataFrame({"rlnImageName": parts["rlnImageName"], "set": sets}).to_csv(split, index=False)
    out, md = tmp_path / "merged.star", tmp_path / "trust.md"
    merge = ["merge", "--particles", "p.star", "--inferred", str(inferred), "--out", str(out)]
    assert cli([*merge, "--labelled", "flagged.star", "--split", str(split),
                "--out-md", str(md)]) == 0  # fmt: skip
    merged = starfile.read(out)["particles"]
    np.testing.assert_allclose(merged["dhModelShiftDrift"], drift, atol=1e-6)
    np.testing.assert_allclose(merged["dhModelAmplitudeDrift"], 10 * drift, atol=1e-5)
    untrusted = [0] * 5 + [1] * 145 + [0] * 10
    assert merged["dhTrusted"].tolist() == untrusted
    assert merged["dhFlagged"].tolist() == [1 - u for u in untrusted]
    held_out = -agreement[15:40]
    mad = 1.4826 * np.median(np.abs(held_out - np.median(held_out)))
    expected = (-agreement - np.median(held_out)) / mad
    np.testing.assert_allclose(merged["dhAgreementZ"], expected, rtol=1e-3, atol=1e-3)
    text = md.read_text(encoding="utf-8")
    assert "10 of the 120 images they answered" in text and "5 of the 40 images" in text
    assert "145 of 160 images trusted" in text
    assert "about 12% of the 120 images the networks answered" in text  # 5 of 40 flagged
    assert len(trusted_rows(merged, "exclude", "m")) == 145
    assert len(trusted_rows(merged, "keep", "m")) == 160
    assert (
        trusted_rows(parts, "exclude", "h")["rlnImageName"].tolist()
        == parts["rlnImageName"].iloc[5:].tolist()
    )
    # with several references the agreement (first reference only) is not used to flag
    two = parts.assign(dhReference=[1, 2] * 20)
    starfile.write({"optics": star["optics"], "particles": two}, "two.star", overwrite=True)
    assert cli([*merge, "--labelled", "two.star", "--out-md", str(md)]) == 0
    assert "dhAgreementZ" not in starfile.read(out)["particles"]
    assert "several references" in md.read_text(encoding="utf-8")
    warn, fine = flag_verdict(5, 40, 3.0), flag_verdict(1, 300, 3.0)
    assert warn.startswith("- ⚠️") and "5 of 40 images (12.5 %)" in warn and "structure" in warn
    assert fine.startswith("- ✅") and "1 of 300" in fine and "reference_update" not in fine


def test_shift_test_time_augmentation_turns_answers_back():
    """`unturn` inverts the labels' quarter turn (`train.transform_labels`); a shift network that
    reads the shift exactly but adds a constant bias answers, after the four turned copies are
    turned back and averaged (`infer.turned_regression`), the exact shifts (the bias cancels), and
    with a variance head its per-axis σ swaps with each quarter turn and adds to the spread."""
    from deephemnma.nets import unturn

    rng = np.random.default_rng(0)
    shifts = torch.tensor(rng.uniform(-3, 3, (40, 2)))
    for k in range(4):
        _, turned = train.transform_labels(
            torch.zeros(40, 3, dtype=shifts.dtype), shifts, torch.full((40,), 90.0 * k), 0
        )
        torch.testing.assert_close(unturn(turned, k), shifts, atol=1e-6, rtol=0)

    d, bias = 16, torch.tensor([0.7, -0.4])
    pos = rng.integers(-4, 5, (40, 2))
    imgs = torch.zeros(40, d, d)
    imgs[torch.arange(40), d // 2 + pos[:, 1], d // 2 + pos[:, 0]] = 1.0

    class Biased(torch.nn.Module):
        """The brightest pixel's offset from the centre (x, y), plus `bias`."""

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # gives `infer.forward` a dtype

        def forward(self, x):
            flat = x[:, 0].reshape(len(x), -1).argmax(-1)
            xy = torch.stack([flat % d, flat // d], -1).float() - d // 2
            return xy + bias

    meta = {"param": "shifts", "mean": torch.zeros(2), "std": torch.ones(2), "box": d}
    net = Biased()
    first = (infer.forward(net, preprocess(imgs, d)), None)
    torch.testing.assert_close(first[0], torch.tensor(pos).float() + bias)
    averaged, sd = infer.turned_regression(net, imgs, meta, first, 4)
    torch.testing.assert_close(averaged, torch.tensor(pos).float(), atol=1e-5, rtol=0)
    assert sd is None
    # with a variance head (σx 0.5, σy 1 in each turned copy's frame): per axis sqrt(mean σ² +
    # the spread of the four turned-back biased answers) = sqrt(0.625 + 0.325)
    logvar = torch.log(torch.tensor([0.25, 1.0]))
    headed = lambda x: torch.cat([Biased.forward(net, x), logvar.expand(len(x), 2)], 1)
    net.forward = headed
    first = nets.decode_regression(
        infer.forward(net, preprocess(imgs, d)), meta["mean"], meta["std"]
    )
    torch.testing.assert_close(first[1], torch.tensor([[0.5, 1.0]]).expand(40, 2))
    averaged, sd = infer.turned_regression(net, imgs, meta, first, 4)
    torch.testing.assert_close(averaged, torch.tensor(pos).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sd, torch.full((40, 2), 0.95**0.5), atol=1e-5, rtol=0)


def test_amplitude_test_time_augmentation_turns_the_views_with_the_images():
    """Amplitudes do not change with a quarter turn: `infer.turned_regression` averages the four
    turned answers as they are, the views turned with their images. A network answering (its
    image's correlation with its first view, the bright pixel's x offset) gives the correlation
    whatever the turn only when the views turn with the images, and x averages out over the
    four turns (x, y, -x, -y sum to zero)."""
    rng = np.random.default_rng(1)
    d, n = 16, 24
    pos = rng.integers(-4, 5, (n, 2))
    imgs = torch.zeros(n, d, d)
    imgs[torch.arange(n), d // 2 + pos[:, 1], d // 2 + pos[:, 0]] = 1.0
    views = torch.tensor(rng.normal(size=(n, 1, d, d)), dtype=torch.float32)

    class Reader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            corr = (x[:, 0] * x[:, 1]).sum((-2, -1))
            flat = x[:, 0].reshape(len(x), -1).argmax(-1)
            return torch.stack([corr, (flat % d).float() - d // 2], -1)

    meta = {"param": "amplitudes", "mean": torch.zeros(2), "std": torch.ones(2), "box": d}
    net = Reader()
    x = torch.cat([preprocess(imgs, d), views], 1)
    first = (infer.forward(net, x), None)
    averaged, sd = infer.turned_regression(net, imgs, meta, first, 4, views)
    torch.testing.assert_close(averaged[:, 0], first[0][:, 0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(averaged[:, 1], torch.zeros(n), atol=1e-6, rtol=0)
    assert sd is None
