"""Learning ladder (after the paper's Table S3, reduced): how hard each step makes the task.

Networks are trained on the ground truth of simulated images of open adenylate kinase (64 px at
2.2 Å/px, Fourier-cropped to a working box), one task harder per row: noise-free at a fixed pose,
+ shifts, + in-plane rotation, + full SO(3), + noise (SNR 0.1) and CTF. Each row renders its images
once, noise-free; noisy rows draw fresh noise for every batch (as synthetic pretraining does).
Errors are on held-out images, next to the trivial baseline (the training mean; for angles the
rotation nearest the mean). Prints one table; ≤ 30 min on 2 cores at the defaults.
`--ablation` instead trains the orientation network of the last row with each network and angle
output (the recipe's ablation: error and training time per change). With `--views` (the
workflow's default) the amplitude network also sees the reference's views: in training at the true
pose moved by the view noise (10°, 0.5 px), on the held-out images at the pose the row's angle and
shift networks predict — so its error includes theirs.

    python bench/learning.py [--n-images 4000] [--epochs 8] [--box 32] [--ablation] [--no-views]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from deephemnma import geometry, imaging, model, nma, quality, simulate, train, views  # noqa: E402
from deephemnma.flexible import FlexibleModel  # noqa: E402
from deephemnma.nets import (  # noqa: E402
    ANGLE_OUTPUTS,
    ARCHS,
    bf16_supported,
    build_network,
    decode_angles,
    n_outputs,
    preprocess,
)

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    ("noise-free, fixed pose", dict(shift=False, psi=False, so3=False, noisy=False)),
    ("+ shifts", dict(shift=True, psi=False, so3=False, noisy=False)),
    ("+ in-plane rotation", dict(shift=True, psi=True, so3=False, noisy=False)),
    ("+ full SO(3)", dict(shift=True, psi=True, so3=True, noisy=False)),
    ("+ noise (SNR 0.1) and CTF", dict(shift=True, psi=True, so3=True, noisy=True)),
]


def flexible_model(folder: Path) -> FlexibleModel:
    """Open AK (heavy atoms) with modes 7-9, torch arrays."""
    atoms = model.prepare_model(REPO / "resources/adk_open.pdb", "heavy", None)
    model.save_model(atoms, folder / "model.npz", folder / "model.pdb")
    _, _, modes = nma.compute_modes(atoms, 3, 15.0, 1.0, 5000)
    m = np.load(folder / "model.npz")
    return FlexibleModel(m["coords"], modes, m["weights"], np.arange(7, 10)).to()


def render_row(flex, n: int, row: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Noise-free images (n, 64, 64) (with CTF on noisy rows), per-image noise sigma, labels
    (with the CTF parameters on noisy rows)."""
    numbers = flex.mode_numbers
    cfg = simulate.SimulationSettings(seed=seed, ctf=row["noisy"])
    params = simulate.draw_parameters(n, numbers, cfg)
    if not row["so3"]:
        params[["rlnAngleRot", "rlnAngleTilt"]] = [30.0, 60.0]
    if not row["psi"]:
        params["rlnAnglePsi"] = 0.0
    if not row["shift"]:
        params[["rlnOriginXAngst", "rlnOriginYAngst"]] = 0.0
    key = "ctf" if row["noisy"] else "clean"
    images = torch.cat(
        [simulate.render(flex, params.iloc[i : i + 64], cfg, None)[key] for i in range(0, n, 64)]
    )
    sigma = (images.var(dim=(-2, -1)) / 0.1).sqrt() if row["noisy"] else torch.zeros(n)
    labels = {
        "euler": params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
        "shifts": -params[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / cfg.pixel_size,
        "amplitudes": params[[f"dhAmplitudeMode{k}" for k in numbers]].to_numpy(),
    }
    if row["noisy"]:
        col = lambda c: torch.tensor(params[c].to_numpy(), dtype=torch.float32)
        labels["ctf_params"] = (col("rlnDefocusU"), col("rlnDefocusV"), col("rlnDefocusAngle"), cfg)
    return images, sigma, labels


def row_views(flex, labels: dict, poses: dict, box: int, n_train: int) -> torch.Tensor:
    """Views (n, 4, box, box) of the reference: training images at their perturbed true pose,
    held-out images at `poses` (the networks' Euler angles and shifts in 64-px pixels)."""
    steps = labels["amplitudes"][:n_train].std(0)
    px = 2.2 * 64 / box
    mv = views.ModeViews.from_model(flex, steps, box, px)
    e, s = views.perturb_poses(labels["euler"][:n_train], labels["shifts"][:n_train], 10, 0.5, 0)
    euler = np.concatenate([e, poses["euler"]])
    shifts = np.concatenate([s, poses["shifts"]]) * box / 64
    ctf = None
    if "ctf_params" in labels:
        du, dv, ang, cfg = labels["ctf_params"]
        ctf = imaging.ctf(
            du, dv, ang, cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast, px, box,
            bfactor=cfg.bfactor,
        )  # fmt: skip
    out = [
        mv.render(
            torch.tensor(euler[i : i + 512]),
            torch.tensor(shifts[i : i + 512]),
            ctf[i : i + 512] if ctf is not None else None,
        )
        for i in range(0, len(euler), 512)
    ]
    return torch.cat(out)


def fit(
    images, sigma, labels, param: str, a: argparse.Namespace, augment: bool, extra=None
) -> tuple[float, dict]:
    """Train one network on the first 80 % of the images (`extra`: views as more channels);
    mean error and the estimates on the rest."""
    torch.manual_seed(0)
    n = len(images)
    n_train = n * 4 // 5
    lab = {k: torch.tensor(labels[k]).float() for k in ("euler", "shifts", "amplitudes")}
    box, epochs, rep = a.box, a.epochs, a.angle_repr
    y_all = train.target_values(param, rep, lab["euler"], lab["shifts"], lab["amplitudes"])
    mean, std = y_all[:n_train].mean(0), y_all[:n_train].std(0).clamp_min(1e-6)
    n_out = n_outputs(param, rep, 3)
    if param == "angles":
        mean, std = torch.zeros(n_out), torch.ones(n_out)
    in_channels = 1 if extra is None else 1 + extra.shape[1]
    net = build_network(a.arch, n_out, in_channels).to(memory_format=torch.channels_last)
    inputs = lambda x, v: preprocess(x, box) if v is None else torch.cat([preprocess(x, box), v], 1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4, fused=True)
    steps = epochs * (n_train // 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.warmup_cosine(steps))
    bf16 = bf16_supported(torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(n_train).split(64)[: n_train // 64]:
            x = images[idx] + sigma[idx, None, None] * torch.randn(images[idx].shape, generator=gen)
            e, s = lab["euler"][idx], lab["shifts"][idx]
            v = extra[idx] if extra is not None else None
            if augment:  # exact quarter turns: labels follow (psi + 90° k, rotated shifts)
                turns, zero = torch.randint(0, 4, (len(idx),)), torch.zeros(len(idx), 2)
                x = train.transform_images(x, turns, zero)
                e, s = train.transform_labels(e, s, 90.0 * turns.float(), zero)
                v = views.transform_views(v, turns, zero) if v is not None else None
            y = train.target_values(param, rep, e, s, lab["amplitudes"][idx])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = net(inputs(x, v).contiguous(memory_format=torch.channels_last))
            loss = train.batch_loss(param, rep, pred, y, mean, std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    g = torch.Generator().manual_seed(2)
    test = images[n_train:] + sigma[n_train:, None, None] * torch.randn(
        images[n_train:].shape, generator=g
    )
    v = extra[n_train:] if extra is not None else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(inputs(test, v).contiguous(memory_format=torch.channels_last)).float()
    out = out * std + mean
    ref = {k: labels[k][n_train:] for k in ("euler", "shifts", "amplitudes")}
    est = dict(ref)
    if param == "angles":
        est["euler"] = geometry.matrix_to_euler(decode_angles(out, rep)[0].double()).numpy()
    else:
        est[param] = out.numpy()
    return float(quality.errors(param, est, ref).mean()), est


def ablation(flex, a: argparse.Namespace) -> None:
    """Orientation error and training time of the last ladder row per network and output."""
    images, sigma, labels = render_row(flex, a.n_images, ROWS[-1][1], seed=3)
    n_train = a.n_images * 4 // 5
    keys = ("euler", "shifts", "amplitudes")
    base = quality.baseline({k: labels[k][:n_train] for k in keys}, a.n_images - n_train)
    ref = {k: labels[k][n_train:] for k in keys}
    b = float(quality.errors("angles", base, ref).mean())
    print(f"angles, {ROWS[-1][0]}; baseline {b:.3g}°")
    print("| network | angle output | angles (deg) | training seconds |")
    print("|---|---|---|---|")
    for arch, rep in [("resnet18", "6d"), ("resnet18", "so3grid"), ("convnet16", "6d"),
                      ("convnet16", "so3grid")]:  # fmt: skip
        t0 = time.perf_counter()
        err, _ = fit(images, sigma, labels, "angles", argparse.Namespace(**{**vars(a),
                     "arch": arch, "angle_repr": rep}), augment=True)  # fmt: skip
        print(f"| {arch} | {rep} | {err:.3g} | {time.perf_counter() - t0:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-images", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--box", type=int, default=32, help="working box (images are 64 px)")
    p.add_argument("--arch", default="convnet16", choices=ARCHS)
    p.add_argument("--angle-repr", default="so3grid", choices=list(ANGLE_OUTPUTS))
    p.add_argument(
        "--rows", type=int, nargs="+", default=range(1, len(ROWS) + 1), help="rows to run (1-based)"
    )
    p.add_argument("--ablation", action="store_true", help="angles of the last row, each recipe")
    p.add_argument(
        "--views",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="amplitudes also see the reference's views at the networks' poses",
    )
    a = p.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {a.n_images} images of 64 px (80 % training), "
        f"working box {a.box}, {a.arch}, {a.epochs} epochs, trained on truth, {a.angle_repr} angles"
        f", amplitudes {'with' if a.views else 'without'} views"
    )
    with tempfile.TemporaryDirectory() as tmp:
        flex = flexible_model(Path(tmp))
    if a.ablation:
        ablation(flex, a)
        return
    print("| task | amplitudes | angles (deg) | shifts (px) | seconds |")
    print("|---|---|---|---|---|")
    for name, row in (ROWS[i - 1] for i in a.rows):
        t0 = time.perf_counter()
        images, sigma, labels = render_row(flex, a.n_images, row, seed=3)
        n_train = a.n_images * 4 // 5
        keys = ("euler", "shifts", "amplitudes")
        base = quality.baseline({k: labels[k][:n_train] for k in keys}, a.n_images - n_train)
        ref = {k: labels[k][n_train:] for k in keys}
        cells, poses = {}, dict(ref)  # the networks' poses where they vary, else the truth
        for param in ("angles", "shifts", "amplitudes"):
            varies = {"angles": row["psi"], "shifts": row["shift"]}.get(param, True)
            if not varies:
                cells[param] = "— (fixed)"
                continue
            extra = None
            if param == "amplitudes" and a.views:
                extra = row_views(flex, labels, poses, a.box, n_train)
            err, est = fit(images, sigma, labels, param, a, augment=row["psi"], extra=extra)
            key = "euler" if param == "angles" else param
            poses[key] = est[key]
            b = float(quality.errors(param, base, ref).mean())
            cells[param] = f"{err:.3g} (baseline {b:.3g})"
        order = ("amplitudes", "angles", "shifts")
        line = " | ".join(cells[p] for p in order)
        print(f"| {name} | {line} | {time.perf_counter() - t0:.0f} |", flush=True)
    print("goal for the last row: amplitudes ≤ 30, angles ≤ 15°")


if __name__ == "__main__":
    main()
