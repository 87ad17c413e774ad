"""train: one ResNet per parameter type (amplitudes | angles | shifts) on labelled images.

Targets are standardised with training-set statistics stored in the checkpoint (quaternions are
unit vectors and are left as they are); images get the same preprocessing in training and
inference (per-image zero mean, unit variance). Augmentation is label-consistent: an in-plane
rotation by α and a translation t turn (psi, d) into (psi + α, Rz(α) d + t) and leave amplitudes
unchanged; only exact pixel permutations are used (quarter turns, integer shifts), so augmented
images keep the noise statistics of real ones. AdamW with a cosine schedule, early stopping on the validation loss, the best epoch
kept, a checkpoint every epoch (a killed job resumes), bf16 autocast and channels_last on CUDA,
DistributedDataParallel under torchrun. The device comes from the environment.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import geometry
from .io import (
    InputError,
    ParticleSet,
    amplitude_modes,
    atomic_path,
    pyplot,
    require_file,
    save_figure,
)
from .nets import ResNet, n_parameters

log = logging.getLogger(__name__)
PARAMS = ("amplitudes", "angles", "shifts")


# ----------------------------------------------------------------------------- labels


def raw_labels(ps: ParticleSet, modes: list[int]) -> dict[str, np.ndarray]:
    """Euler (n, 3) degrees, shifts (n, 2) px, amplitudes (n, K) of a labelled particle set."""
    return {"euler": ps.euler(), "shifts": ps.shifts_px(), "amplitudes": ps.amplitudes(modes)}


def target_values(
    param: str, angle_repr: str, euler: torch.Tensor, shifts: torch.Tensor, amps: torch.Tensor
) -> torch.Tensor:
    """Unstandardised targets of one parameter type."""
    if param == "amplitudes":
        return amps
    if param == "shifts":
        return shifts
    return geometry.euler_to_quaternion(euler) if angle_repr == "quaternion" else euler


def n_outputs(param: str, angle_repr: str, n_modes: int) -> int:
    return {"amplitudes": n_modes, "shifts": 2}.get(param, 4 if angle_repr == "quaternion" else 3)


def quaternion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - <q̂, q>², q̂ the normalised prediction: zero for q and -q, grows with the angle."""
    q = pred / pred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (1.0 - (q * target).sum(-1) ** 2).mean()


# ----------------------------------------------------------------------------- images


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(B, D, D) -> (B, 1, D, D), each image to zero mean and unit variance."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return ((images - mean) / std)[:, None]


def transform_images(
    images: torch.Tensor, quarter_turns: torch.Tensor, t_px: torch.Tensor
) -> torch.Tensor:
    """Rotate images (B, D, D) in plane by α = 90° × quarter_turns (RELION's psi sense) about
    D // 2, then translate by the integer shifts t_px (B, 2) — exact pixel permutations (with
    wrap-around), so the noise keeps its statistics: out(q) = in(Rz(α)ᵀ (q - t)),
    Rz(α) = [[cos α, sin α], [-sin α, cos α]] acting on (x, y).
    """
    b, d = images.shape[0], images.shape[-1]
    k = quarter_turns.long() % 4
    cos = torch.tensor([1, 0, -1, 0], device=images.device)[k][:, None, None]
    sin = torch.tensor([0, 1, 0, -1], device=images.device)[k][:, None, None]
    c = torch.arange(d, device=images.device) - d // 2
    qy, qx = torch.meshgrid(c, c, indexing="ij")
    t = t_px.round().long()
    qx, qy = qx[None] - t[:, 0, None, None], qy[None] - t[:, 1, None, None]
    sx = (cos * qx - sin * qy + d // 2) % d
    sy = (sin * qx + cos * qy + d // 2) % d
    flat = images.reshape(b, d * d)
    return torch.gather(flat, 1, (sy * d + sx).reshape(b, -1)).reshape(b, d, d)


def transform_labels(
    euler: torch.Tensor, shifts: torch.Tensor, alpha_deg: torch.Tensor, t_px: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of images transformed by `transform_images`."""
    a = torch.deg2rad(alpha_deg)
    c, s = torch.cos(a), torch.sin(a)
    new_shift = (
        torch.stack([c * shifts[:, 0] + s * shifts[:, 1], -s * shifts[:, 0] + c * shifts[:, 1]], -1)
        + t_px
    )
    new_euler = euler.clone()
    new_euler[:, 2] = torch.remainder(euler[:, 2] + alpha_deg + 180.0, 360.0) - 180.0
    return new_euler, new_shift


class ImageRows(Dataset):
    """Items (image, euler, shift, amplitudes) of given rows of a memory-mapped particle set."""

    def __init__(self, ps: ParticleSet, rows: np.ndarray, labels: dict[str, np.ndarray]):
        self.images, self.rows, self.labels = ps.images, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        return (
            torch.from_numpy(self.images[np.array([r])][0]),
            *(
                torch.from_numpy(self.labels[k][r]).float()
                for k in ("euler", "shifts", "amplitudes")
            ),
        )


# ----------------------------------------------------------------------------- training


def setup_device() -> tuple[torch.device, int, int]:
    """(device, rank, world size) from the environment (torchrun sets RANK/WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def loss_and_metric(
    param: str,
    angle_repr: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss and the summed metric (degrees, amplitude units or pixels) of a batch."""
    pred = pred.float()
    if param == "angles" and angle_repr == "quaternion":
        loss = quaternion_loss(pred, target)
        metric = geometry.quaternion_distance_deg(pred.detach(), target).sum()
        return loss, metric
    loss = torch.nn.functional.mse_loss(pred, (target - mean) / std)
    value = pred.detach() * std + mean
    if param == "angles":
        metric = geometry.euler_distance_deg(value.double(), target.double()).sum()
    elif param == "shifts":
        metric = (value - target).norm(dim=-1).sum()
    else:
        metric = (value - target).abs().mean(-1).sum()
    return loss, metric


def loss_figure(history: pd.DataFrame, param: str, path: Path) -> None:
    """Training and validation loss per epoch (seed Figure S6) and the validation metric."""
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(history["epoch"], history["train_loss"], label="training")
    a1.plot(history["epoch"], history["val_loss"], label="validation")
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(history["epoch"], history["val_metric"], color="tab:green")
    a2.set_xlabel("epoch")
    unit = {"angles": "mean angular error (deg)", "shifts": "mean shift error (px)"}
    a2.set_ylabel(unit.get(param, "mean |amplitude error|"))
    fig.suptitle(f"{param} network")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def train(args: argparse.Namespace) -> None:
    device, rank, world = setup_device()
    torch.manual_seed(args.seed + rank)
    ps = ParticleSet(require_file(args.labels, "label STAR"))
    modes = amplitude_modes(ps.particles)
    if args.param == "amplitudes" and not modes:
        raise InputError(f"{args.labels}: no _dhAmplitudeMode<k> columns to learn")
    split = pd.read_csv(require_file(args.split, "split CSV"))
    sets = ps.particles[["rlnImageName"]].merge(split, on="rlnImageName", how="left")["set"]
    if sets.isna().any():
        raise InputError(f"{args.split}: does not cover every image of {args.labels}")
    train_rows = np.nonzero((sets == "train").to_numpy())[0]
    val_rows = np.nonzero((sets == "val").to_numpy())[0]
    labels = raw_labels(ps, modes)
    tgt = target_values(
        args.param,
        args.angle_repr,
        *(torch.tensor(labels[k][train_rows]) for k in ("euler", "shifts", "amplitudes")),
    )
    mean, std = tgt.mean(0).float(), tgt.std(0).float().clamp_min(1e-6)
    if args.param == "angles" and args.angle_repr == "quaternion":
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    n_out = n_outputs(args.param, args.angle_repr, len(modes))
    model = ResNet(args.arch, n_out).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    out = Path(args.out_dir)
    ckpt_path = out / "checkpoint.pt"
    state = {"epoch": 0, "best_val": math.inf, "best_state": None, "bad_epochs": 0, "history": []}
    fingerprint = {
        k: v
        for k, v in sorted(vars(args).items())
        if k not in ("module", "verbose", "workers", "stop_after_epoch")
    }
    fingerprint = repr(fingerprint) + f" world={world}"
    ckpt = (
        torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt_path.exists()
        else None
    )
    if ckpt is not None and ckpt.get("fingerprint") != fingerprint:
        log.info("ignoring %s: written by a run with other settings", ckpt_path)
        ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        sched.load_state_dict(ckpt["sched"])
        state = {k: ckpt[k] for k in state}
        log.info("resuming from %s after epoch %d", ckpt_path, state["epoch"])
    loader_kw = {
        "num_workers": args.workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": args.workers > 0,
    }
    tr_ds, va_ds = ImageRows(ps, train_rows, labels), ImageRows(ps, val_rows, labels)
    tr_sampler = DistributedSampler(tr_ds, seed=args.seed) if world > 1 else None
    va_sampler = DistributedSampler(va_ds, shuffle=False) if world > 1 else None
    tr = DataLoader(
        tr_ds,
        batch_size=args.batch_size,
        shuffle=tr_sampler is None,
        sampler=tr_sampler,
        drop_last=len(tr_ds) > args.batch_size,
        **loader_kw,
    )
    va = DataLoader(va_ds, batch_size=args.batch_size, sampler=va_sampler, **loader_kw)
    mean, std = mean.to(device), std.to(device)
    amp_ctx = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    def batches(loader, augment: bool):
        for img, eul, sh, amp in loader:
            img, eul, sh, amp = (x.to(device, non_blocking=True) for x in (img, eul, sh, amp))
            if augment:
                turns = torch.randint(0, 4, (len(img),), device=device)
                r = int(args.augment_shift_px)
                t = torch.randint(-r, r + 1, (len(img), 2), device=device).float()
                img = transform_images(img, turns, t)
                eul, sh = transform_labels(eul, sh, 90.0 * turns.float(), t)
            x = preprocess(img)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, target_values(args.param, args.angle_repr, eul, sh, amp).float()

    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        t0 = time.perf_counter()
        if tr_sampler is not None:
            tr_sampler.set_epoch(epoch)
        net.train()
        tot = torch.zeros(2, device=device)
        for x, y in batches(tr, args.augment):
            with amp_ctx():
                pred = net(x)
            loss, _ = loss_and_metric(args.param, args.angle_repr, pred, y, mean, std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += torch.stack([loss.detach() * len(x), torch.tensor(len(x), device=device)])
        sched.step()
        net.eval()
        val = torch.zeros(3, device=device)
        with torch.no_grad():
            for x, y in batches(va, False):
                with amp_ctx():
                    pred = net(x)
                loss, metric = loss_and_metric(args.param, args.angle_repr, pred, y, mean, std)
                val += torch.stack([loss * len(x), metric, torch.tensor(len(x), device=device)])
        if world > 1:
            dist.all_reduce(tot)
            dist.all_reduce(val)
        row = {
            "epoch": epoch,
            "train_loss": float(tot[0] / tot[1]),
            "val_loss": float(val[0] / val[2]),
            "val_metric": float(val[1] / val[2]),
            "lr": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
        }
        state["history"].append(row)
        state["epoch"] = epoch
        if row["val_loss"] < state["best_val"]:
            state["best_val"], state["bad_epochs"] = row["val_loss"], 0
            state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        if rank == 0:
            log.info(
                "epoch %d: train %.4f, val %.4f, metric %.3f (%.1f s)",
                epoch,
                row["train_loss"],
                row["val_loss"],
                row["val_metric"],
                row["seconds"],
            )
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optim": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "fingerprint": fingerprint,
                        **state,
                    },
                    tmp,
                )
        if args.stop_after_epoch and epoch == args.stop_after_epoch:
            return  # testing hook: behave like a job killed after this epoch's checkpoint
        if state["bad_epochs"] >= args.patience:
            log.info("early stop: no validation improvement for %d epochs", args.patience)
            break
    if rank == 0:
        final = {
            "state_dict": state["best_state"],
            "arch": args.arch,
            "param": args.param,
            "angle_repr": args.angle_repr,
            "n_out": n_out,
            "mean": mean.cpu(),
            "std": std.cpu(),
            "box": ps.box,
            "pixel_size": ps.pixel_size,
            "mode_numbers": modes,
            "best_val_loss": state["best_val"],
        }
        with atomic_path(out / "model.pt") as tmp:
            torch.save(final, tmp)
        history = pd.DataFrame(state["history"])
        with atomic_path(out / "history.csv") as tmp:
            history.to_csv(tmp, index=False, float_format="%.6g")
        loss_figure(history, args.param, out / "loss.png")
        ckpt_path.unlink()  # finished: a later run with new settings starts afresh
        log.info(
            "%s %s: %.1f M parameters, best validation loss %.4f",
            args.param,
            args.arch,
            n_parameters(model) / 1e6,
            state["best_val"],
        )
    if world > 1:
        dist.destroy_process_group()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param", choices=PARAMS, required=True)
    p.add_argument("--labels", required=True, help="labelled particle STAR")
    p.add_argument("--split", required=True, help="split CSV")
    p.add_argument(
        "--arch", default="resnet34", choices=["resnet18", "resnet34", "resnet50", "resnet101"]
    )
    p.add_argument("--angle-repr", default="quaternion", choices=["quaternion", "euler"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--augment-shift-px", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after-epoch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--out-dir", required=True, help="model.pt, history.csv, loss.png, checkpoint.pt"
    )


def main(args: argparse.Namespace) -> None:
    train(args)
