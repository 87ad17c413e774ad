"""train: one network per parameter type (amplitudes | angles | shifts) on labelled images.

Optionally pretrained first on synthetic images of the flexible model (`deephemnma synthesize`:
exact labels, the data's CTFs and noise level, fresh noise every epoch), then fine-tuned on the
labelled images. Images are Fourier-cropped to a working box and normalised per image, the same in
training and inference (`nets.preprocess`). Targets are standardised with training-set statistics
stored in the checkpoint; orientations are classified over a rotation grid with soft targets by
default (`nets.ANGLE_OUTPUTS`), or regressed in the 6D representation (chordal loss), as
quaternions or Euler angles (the paper's ablation). Amplitudes (by default; shifts on request)
also predict their variance (a Gaussian likelihood with the mean detached: a per-image
uncertainty that leaves the values' gradient unchanged). With views, the amplitude network also sees
the reference's views (`views.ModeViews`) at each image's labelled pose moved by the view noise
(as the angle and shift networks' answers will be at inference), rendered once. Augmentation is
label-consistent: an in-plane rotation by α and a translation t turn (psi, d) into
(psi + α, Rz(α) d + t) and leave amplitudes unchanged; only exact pixel permutations are used
(quarter turns, integer shifts), so augmented images keep the noise statistics of real ones.
AdamW with linear warm-up and cosine decay per step over both phases, early stopping on the
validation loss, the best epoch kept, a checkpoint every epoch fingerprinted by the settings and
the content of labels, split and synthetic set (a killed job resumes; changed labels start
afresh), bf16 autocast where the device has it, channels_last, DistributedDataParallel under
torchrun. The validation error is logged and plotted next to the trivial baseline's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import geometry, quality
from .figures import pyplot, save_figure
from .files import InputError, atomic_path, require_file
from .flexible import FlexibleModel
from .io import ParticleSet, amplitude_modes
from .mrc import ParticleImages
from .nets import (
    ANGLE_OUTPUTS,
    ARCHS,
    LOGVAR_MAX,
    bf16_supported,
    build_network,
    decode_angles,
    grid_targets,
    n_outputs,
    n_parameters,
    preprocess,
    transform_images,
    turn_shifts,
)
from .views import ModeViews, perturb_poses, transform_views

log = logging.getLogger(__name__)
PARAMS = ("amplitudes", "angles", "shifts")
LABEL_KEYS = ("euler", "shifts", "amplitudes")


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
    if angle_repr in ("6d", "so3grid"):  # so3grid: the rotation, to build the soft target from
        return geometry.matrix_to_sixd(geometry.euler_to_matrix(euler))
    return geometry.euler_to_quaternion(euler) if angle_repr == "quaternion" else euler


def quaternion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - <q̂, q>², q̂ the normalised prediction: zero for q and -q, grows with the angle."""
    q = pred / pred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (1.0 - (q * target).sum(-1) ** 2).mean()


# ----------------------------------------------------------------------------- images


def transform_labels(
    euler: torch.Tensor, shifts: torch.Tensor, alpha_deg: torch.Tensor, t_px: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of images transformed by `transform_images`."""
    new_shift = turn_shifts(shifts, alpha_deg) + t_px
    new_euler = euler.clone()
    new_euler[:, 2] = torch.remainder(euler[:, 2] + alpha_deg + 180.0, 360.0) - 180.0
    return new_euler, new_shift


class ImageRows(Dataset):
    """Items (image, euler, shift, amplitudes, row) of given rows of images and label arrays."""

    def __init__(self, images: ParticleImages, rows: np.ndarray, labels: dict[str, np.ndarray]):
        self.images, self.rows, self.labels = images, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        return (
            torch.from_numpy(self.images[np.array([r])][0]),
            *(torch.from_numpy(self.labels[k][r]).float() for k in LABEL_KEYS),
            torch.tensor(r),
        )


@dataclass
class Synthetic:
    """Pretraining images from `deephemnma synthesize`: noise-free at the working box, held in
    memory on the training device; white noise of `noise_sigma` is added afresh to every batch."""

    images: torch.Tensor  # (n, box, box)
    labels: dict[str, torch.Tensor]
    noise_sigma: float
    box: int
    meta_text: str  # meta.json as written, for the checkpoint fingerprint
    ctf: dict[str, np.ndarray] | None  # CTF parameters per image (`ParticleSet.ctf_params`)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device) -> Synthetic:
        folder = Path(folder)
        meta_text = require_file(folder / "meta.json", "synthetic meta.json").read_text(
            encoding="utf-8"
        )
        meta = json.loads(meta_text)
        images = np.load(require_file(folder / "images.npy", "synthetic images"))
        with np.load(require_file(folder / "labels.npz", "synthetic labels")) as z:
            labels = {k: torch.tensor(z[k]).float().to(device) for k in LABEL_KEYS}
            ctf = {k[4:]: z[k] for k in z.files if k.startswith("ctf_")} or None
        if images.shape[0] != len(labels["euler"]):
            raise InputError(
                f"{folder}: {images.shape[0]} images but {len(labels['euler'])} labels"
            )
        images = torch.from_numpy(images).to(device)
        return cls(images, labels, float(meta["noise_sigma"]), int(meta["box"]), meta_text, ctf)

    def n_batches(self, batch_size: int, world: int) -> int:
        return len(self.images) // world // batch_size

    def batches(self, batch_size: int, epoch: int, rank: int, world: int, seed: int):
        """Shuffled full batches (image, euler, shift, amplitudes, index) of this rank's share."""
        gen = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(len(self.images), generator=gen)[rank::world]
        for idx in perm[: self.n_batches(batch_size, world) * batch_size].split(batch_size):
            idx = idx.to(self.images.device)
            yield self.images[idx], *(self.labels[k][idx] for k in LABEL_KEYS), idx


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


def batch_loss(
    param: str,
    angle_repr: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Training loss of a batch.

    Regression outputs twice the target's size hold a log-variance per value after the values
    (a variance head): the loss adds the Gaussian negative log-likelihood of the residual with
    the mean detached, so the values learn exactly as with the mean squared error alone and the
    variance learns to predict their squared error (heteroscedastic regression)."""
    pred = pred.float()
    if param == "angles" and angle_repr == "so3grid":
        ref = geometry.sixd_to_matrix(target)
        return -(grid_targets(ref) * torch.log_softmax(pred, -1)).sum(-1).mean()
    if param == "angles" and angle_repr == "6d":
        rot, ref = geometry.sixd_to_matrix(pred), geometry.sixd_to_matrix(target)
        return ((rot - ref) ** 2).sum((-2, -1)).mean()  # chordal: 4 (1 - cos angle)
    if param == "angles" and angle_repr == "quaternion":
        return quaternion_loss(pred, target)
    z = (target - mean) / std
    k = target.shape[-1]
    loss = torch.nn.functional.mse_loss(pred[:, :k], z)
    if pred.shape[-1] == 2 * k:  # variance head: Gaussian NLL of the detached mean's residual
        logvar = pred[:, k:].clamp(-LOGVAR_MAX, LOGVAR_MAX)
        resid2 = (z - pred[:, :k].detach()) ** 2
        loss = loss + 0.5 * (logvar + resid2 * torch.exp(-logvar)).mean()
    return loss


def batch_metric(
    param: str,
    angle_repr: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Summed error of a batch (degrees, amplitude units or pixels); validation only: training
    steps skip it (decoding an SO(3)-grid answer costs a tenth of a step)."""
    pred = pred.detach().float()
    if param == "angles" and angle_repr in ("so3grid", "6d"):
        rot, _ = decode_angles(pred, angle_repr)
        return geometry.matrix_distance_deg(rot, geometry.sixd_to_matrix(target)).sum()
    if param == "angles" and angle_repr == "quaternion":
        return geometry.quaternion_distance_deg(pred, target).sum()
    value = pred[:, : target.shape[-1]] * std + mean
    if param == "angles":
        return geometry.euler_distance_deg(value.double(), target.double()).sum()
    if param == "shifts":
        return (value - target).norm(dim=-1).sum()
    return (value - target).abs().mean(-1).sum()


def loss_figure(history: pd.DataFrame, param: str, baseline: float, path: Path) -> None:
    """Training and validation loss per epoch (paper Figure S6) and the validation error next
    to the trivial baseline's."""
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(history["epoch"], history["train_loss"], label="training")
    a1.plot(history["epoch"], history["val_loss"], label="validation")
    if min(history["train_loss"].min(), history["val_loss"].min()) > 0:
        a1.set_yscale("log")  # a variance head's likelihood can be negative
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(history["epoch"], history["val_metric"], color="tab:green", label="network")
    a2.axhline(baseline, color="k", ls="--", lw=0.8, label="trivial baseline")
    a2.axhline(baseline / 2, color="k", ls=":", lw=0.8, label="½ baseline")
    a2.set_ylim(bottom=0)
    a2.set_xlabel("epoch")
    unit = {"angles": "mean angular error (deg)", "shifts": "mean shift error (px)"}
    a2.set_ylabel(unit.get(param, "mean |amplitude error|"))
    a2.legend(fontsize=8)
    pre = history["phase"] == "pretrain" if "phase" in history else None
    if pre is not None and pre.any():
        for ax in (a1, a2):
            ax.axvspan(0.5, history["epoch"][pre].max() + 0.5, color="0.9", zorder=0)
        a2.text(0.02, 0.02, "grey: synthetic pretraining", transform=a2.transAxes, fontsize=8)
    fig.suptitle(f"{param} network")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def content_hash(*parts) -> str:
    """SHA-256 of arrays and strings: what a checkpoint was trained on, not where it came from."""
    h = hashlib.sha256()
    for part in parts:
        h.update(
            np.ascontiguousarray(part).tobytes()
            if isinstance(part, np.ndarray)
            else str(part).encode()
        )
    return h.hexdigest()


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.05):
    """LR multiplier per optimiser step: linear warm-up, then a cosine decay to zero."""
    warm = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return factor


def phased_schedule(pretrain_steps: int, finetune_steps: int, finetune_scale: float = 0.3):
    """LR multiplier per step over pretraining then fine-tuning: each phase its own warm-up and
    cosine decay, fine-tuning peaking at `finetune_scale` (one cosine over both phases would
    leave the fine-tuning steps, the last few, at a learning rate near zero)."""
    pre = warmup_cosine(pretrain_steps) if pretrain_steps else None
    fine = warmup_cosine(finetune_steps)

    def factor(step: int) -> float:
        if step < pretrain_steps:
            return pre(step)
        return (finetune_scale if pretrain_steps else 1.0) * fine(step - pretrain_steps)

    return factor


@dataclass
class TrainSettings:
    """How one network is trained; the CLI's defaults are these."""

    param: str
    arch: str = "resnet34"
    angle_repr: str = "so3grid"
    box: int | None = None  # working box; None: the particles'
    pretrain_epochs: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8
    augment: bool = True
    augment_shift_px: int = 2
    views: bool = False  # amplitudes: also see the reference's views at the image's pose
    view_noise_deg: float = 10.0
    view_noise_px: float = 0.5
    variance: bool | None = None  # a variance head (per-image uncertainty); None: amplitudes only
    workers: int = 2  # data-loading processes (not part of the checkpoint fingerprint)
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSettings:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


class Trainer:
    """One network: data, model, optimiser, checkpoints, the training loop and the export.

    `fit` resumes from `out_dir/checkpoint.pt` when it was written with the same settings and
    the same labels, split and synthetic set (its fingerprint), and starts afresh otherwise.
    `flexible` (model.npz, modes.npz, atom σ in Å) is needed by amplitude networks with views.
    """

    def __init__(
        self,
        settings: TrainSettings,
        labels: str | Path,
        split: str | Path,
        out_dir: str | Path,
        pretrain: str | Path | None = None,
        flexible: tuple[str | Path, str | Path, float] | None = None,
    ):
        s = self.s = settings
        self.device, self.rank, self.world = setup_device()
        torch.manual_seed(s.seed + self.rank)
        ps = self.ps = ParticleSet(require_file(labels, "label STAR"))
        self.modes = amplitude_modes(ps.particles)
        if s.param == "amplitudes" and not self.modes:
            raise InputError(f"{labels}: no _dhAmplitudeMode<k> columns to learn")
        table = pd.read_csv(require_file(split, "split CSV"))
        sets = ps.particles[["rlnImageName"]].merge(table, on="rlnImageName", how="left")["set"]
        if sets.isna().any():
            raise InputError(f"{split}: does not cover every image of {labels}")
        train_rows = np.nonzero((sets == "train").to_numpy())[0]
        val_rows = np.nonzero((sets == "val").to_numpy())[0]
        self.labels = raw_labels(ps, self.modes)
        self.box = s.box or ps.box
        if self.box > ps.box:
            raise InputError(f"working box {self.box} is larger than the particles' box {ps.box}")
        syn = self.synthetic = (
            Synthetic.load(pretrain, self.device) if pretrain and s.pretrain_epochs else None
        )
        if syn is not None and syn.box != self.box:
            raise InputError(f"{pretrain}: rendered at {syn.box} px, networks work at {self.box}")
        self.pretrain_epochs = s.pretrain_epochs if syn is not None else 0
        self.n_train, self.n_val = len(train_rows), len(val_rows)
        self._targets_and_baseline(train_rows, val_rows)
        self._views_setup(flexible)
        in_channels = 1 if self.views is None else 1 + self.views.volumes.shape[0]
        self.model = build_network(s.arch, self.n_out, in_channels).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.net = (
            torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        )
        self.opt = torch.optim.AdamW(  # fused: 1.35 x the steps per second of a small net on a CPU
            self.net.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=True
        )
        self.train_loader, self.train_sampler = self._loader(train_rows, shuffle=True)
        self.val_loader, _ = self._loader(val_rows, shuffle=False)
        syn_steps = syn.n_batches(s.batch_size, self.world) if syn else 0
        schedule = phased_schedule(
            self.pretrain_epochs * syn_steps, s.epochs * len(self.train_loader)
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.out = Path(out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.state = {"epoch": 0, "best_val": math.inf, "best_state": None, "bad_epochs": 0}
        self.state["history"] = []
        fixed = {k: v for k, v in sorted(asdict(s).items()) if k != "workers"}
        self.fingerprint = content_hash(
            repr(fixed),
            f"world={self.world}",
            ps.particles["rlnImageName"].to_numpy(str),
            sets.to_numpy(str),
            *(self.labels[k] for k in LABEL_KEYS),
            syn.meta_text if syn else "",
            self.views.volumes.numpy() if self.views is not None else "",
        )
        self.bf16 = bf16_supported(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(s.seed + 1000 * self.rank)
        self.load_checkpoint()

    def _targets_and_baseline(self, train_rows: np.ndarray, val_rows: np.ndarray) -> None:
        """Target standardisation from the training rows; the trivial baseline's val error."""
        s, lab = self.s, self.labels
        tgt = target_values(
            s.param, s.angle_repr, *(torch.tensor(lab[k][train_rows]) for k in LABEL_KEYS)
        )
        variance = s.param == "amplitudes" if s.variance is None else s.variance
        self.n_out = n_outputs(s.param, s.angle_repr, len(self.modes), variance)
        mean, std = tgt.mean(0).float(), tgt.std(0).float().clamp_min(1e-6)
        if s.param == "angles" and s.angle_repr != "euler":
            mean, std = torch.zeros(self.n_out), torch.ones(self.n_out)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        base = quality.baseline({k: v[train_rows] for k, v in lab.items()}, len(val_rows))
        val_labels = {k: v[val_rows] for k, v in lab.items()}
        self.baseline_error = float(quality.errors(s.param, base, val_labels).mean())

    def _views_setup(self, flexible: tuple[str | Path, str | Path, float] | None) -> None:
        """Amplitudes with views: the reference's views (`views.ModeViews`, one step of one
        training-amplitude standard deviation per mode) at every labelled and synthetic image's
        pose, perturbed by the view noise, rendered once with the image's CTF."""
        s, ps = self.s, self.ps
        self.views = self.view_cache = self.syn_view_cache = None
        if not (s.views and s.param == "amplitudes"):
            return
        if flexible is None:
            raise InputError("amplitude networks with views need the model and its modes")
        model = FlexibleModel.load(flexible[0], flexible[1])
        if [int(k) for k in model.mode_numbers] != self.modes:
            raise InputError(
                f"{flexible[1]}: modes {model.mode_numbers.tolist()} differ from the labels' "
                f"{self.modes}"
            )
        px = ps.pixel_size * ps.box / self.box
        steps = self.std.cpu().numpy()
        self.views = ModeViews.from_model(model, steps, self.box, px, flexible[2])
        lab = self.labels
        ctf = ps.ctf_params() if ps.has_ctf else None
        self.view_cache = self._render_views(lab["euler"], lab["shifts"], ctf, s.seed)
        if self.synthetic is not None:
            syn = self.synthetic
            if ps.has_ctf and syn.ctf is None:
                raise InputError("the synthetic set has no CTF parameters: synthesize it again")
            euler, shifts = (syn.labels[k].double().cpu().numpy() for k in ("euler", "shifts"))
            self.syn_view_cache = self._render_views(euler, shifts, syn.ctf, s.seed + 1)
        log.info("amplitudes with views: %d channels of the reference", len(self.views.volumes))

    def _render_views(
        self, euler: np.ndarray, shifts_px: np.ndarray, ctf: dict | None, seed: int
    ) -> torch.Tensor:
        """Views (n, K + 1, box, box) at perturbed poses (shifts in pixels of the particles)."""
        s = self.s
        euler, shifts = perturb_poses(euler, shifts_px, s.view_noise_deg, s.view_noise_px, seed)
        out = [
            self.views.of_particles(euler[r], shifts[r], self.ps.box, ctf, r)
            for r in np.array_split(np.arange(len(euler)), max(1, -(-len(euler) // 512)))
        ]
        return torch.cat(out).to(self.device)

    def _loader(self, rows: np.ndarray, shuffle: bool):
        ds = ImageRows(self.ps.images, rows, self.labels)
        s = self.s
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=s.seed) if self.world > 1 else None
        loader = DataLoader(
            ds,
            batch_size=s.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle and len(ds) > s.batch_size,
            num_workers=s.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=s.workers > 0,
        )
        return loader, sampler

    def _inputs(self, items, augment: bool, noise_sigma: float = 0.0, views=None):
        """(network input, target) batches: fresh noise, label-consistent augmentation, and
        the images' views (`views`: a cache indexed by the items' last element) as channels."""
        s, dev = self.s, self.device
        for img, eul, sh, amp, idx in items:
            img, eul, sh, amp = (x.to(dev, non_blocking=True) for x in (img, eul, sh, amp))
            v = views[idx.to(dev)] if views is not None else None
            if noise_sigma:
                noise = torch.randn(img.shape, generator=self.gen, device=dev, dtype=img.dtype)
                img = img + noise_sigma * noise
            if augment:
                turns = torch.randint(0, 4, (len(img),), device=dev)
                r = s.augment_shift_px
                t = torch.randint(-r, r + 1, (len(img), 2), device=dev).float()
                img = transform_images(img, turns, t)
                eul, sh = transform_labels(eul, sh, 90.0 * turns.float(), t)
                if v is not None:
                    v = transform_views(v, turns, t * self.box / self.ps.box)
            x = preprocess(img, self.box)
            if v is not None:
                x = torch.cat([x, v.to(x.dtype)], 1)
            x = x.contiguous(memory_format=torch.channels_last)
            yield x, target_values(s.param, s.angle_repr, eul, sh, amp).float()

    def _loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return batch_loss(self.s.param, self.s.angle_repr, pred, y, self.mean, self.std)

    def train_epoch(self, epoch: int) -> float:
        """One epoch (synthetic images while pretraining, then the labelled ones); mean loss."""
        s, dev = self.s, self.device
        if epoch <= self.pretrain_epochs:
            data = self.synthetic.batches(s.batch_size, epoch, self.rank, self.world, s.seed)
            noise, views = self.synthetic.noise_sigma, self.syn_view_cache
        else:
            data, noise, views = self.train_loader, 0.0, self.view_cache
            if self.train_sampler is not None:
                self.train_sampler.set_epoch(epoch)
        self.net.train()
        tot = torch.zeros(2, device=dev)
        for x, y in self._inputs(data, s.augment, noise, views):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                pred = self.net(x)
            loss = self._loss(pred, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            tot += torch.stack([loss.detach() * len(x), torch.tensor(len(x), device=dev)])
        if self.world > 1:
            dist.all_reduce(tot)
        return float(tot[0] / tot[1])

    def validate(self) -> tuple[float, float]:
        """Mean loss and mean error (degrees, amplitude units or pixels) on validation images."""
        self.net.eval()
        val = torch.zeros(3, device=self.device)
        with torch.no_grad():
            for x, y in self._inputs(self.val_loader, False, views=self.view_cache):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    pred = self.net(x)
                loss = self._loss(pred, y)
                metric = batch_metric(self.s.param, self.s.angle_repr, pred, y, self.mean, self.std)
                val += torch.stack([loss * len(x), metric, torch.tensor(len(x), device=val.device)])
        if self.world > 1:
            dist.all_reduce(val)
        return float(val[0] / val[2]), float(val[1] / val[2])

    def fit(self, max_epochs: int | None = None) -> bool:
        """Train up to epoch `max_epochs` (default: to the end), a checkpoint after every epoch;
        export the best epoch when training ends (all epochs run, or early stop). Returns
        whether it ended."""
        s, state = self.s, self.state
        total = self.pretrain_epochs + s.epochs
        last = total if max_epochs is None else min(max_epochs, total)
        log.info(
            "%s %s at %d px: %d training, %d validation images; %d synthetic pretraining epochs; "
            "trivial baseline %.3g",
            s.param, s.arch, self.box, self.n_train, self.n_val, self.pretrain_epochs,
            self.baseline_error,
        )  # fmt: skip
        for epoch in range(state["epoch"] + 1, last + 1):
            t0 = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            val_loss, val_metric = self.validate()
            row = {
                "epoch": epoch,
                "phase": "pretrain" if epoch <= self.pretrain_epochs else "finetune",
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_metric": val_metric,
                "lr": self.sched.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
            state["history"].append(row)
            state["epoch"] = epoch
            if val_loss < state["best_val"]:
                state["best_val"], state["bad_epochs"] = val_loss, 0
                state["best_state"] = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items()
                }
            else:
                state["bad_epochs"] += 1
            if self.rank == 0:
                log.info(
                    "epoch %d (%s): train %.4f, val %.4f, error %.3f (baseline %.3g) (%.1f s)",
                    epoch, row["phase"], train_loss, val_loss, val_metric, self.baseline_error,
                    row["seconds"],
                )  # fmt: skip
                self.save_checkpoint()
            if state["bad_epochs"] >= s.patience and row["phase"] == "finetune":
                log.info("early stop: no validation improvement for %d epochs", s.patience)
                break
        else:
            if last < total:
                return False
        if self.rank == 0:
            self.export()
        return True

    def save_checkpoint(self) -> None:
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(
                {
                    "model": self.model.state_dict(),
                    "optim": self.opt.state_dict(),
                    "sched": self.sched.state_dict(),
                    "fingerprint": self.fingerprint,
                    **self.state,
                },
                tmp,
            )

    def load_checkpoint(self) -> bool:
        """Resume from the checkpoint if it has this run's fingerprint; whether it did."""
        if not self.ckpt_path.exists():
            return False
        ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        if ckpt.get("fingerprint") != self.fingerprint:
            log.info("ignoring %s: written by a run with other settings or labels", self.ckpt_path)
            return False
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optim"])
        self.sched.load_state_dict(ckpt["sched"])
        self.state = {k: ckpt[k] for k in self.state}
        log.info("resuming from %s after epoch %d", self.ckpt_path, self.state["epoch"])
        return True

    def export(self) -> None:
        """network.pt (the best epoch and what inference needs), history.csv, loss.png."""
        s, out = self.s, self.out
        history = pd.DataFrame(self.state["history"])
        best = history.loc[history["val_loss"].idxmin()]
        final = {
            "state_dict": self.state["best_state"],
            "arch": s.arch,
            "param": s.param,
            "angle_repr": s.angle_repr,
            "n_out": self.n_out,
            "mean": self.mean.cpu(),
            "std": self.std.cpu(),
            "box": self.box,
            "particle_box": self.ps.box,
            "pixel_size": self.ps.pixel_size,
            "mode_numbers": self.modes,
            "best_val_loss": self.state["best_val"],
            "val_error": float(best["val_metric"]),
            "val_baseline": self.baseline_error,
            "in_channels": 1 if self.views is None else 1 + len(self.views.volumes),
            "augment": s.augment,  # quarter turns seen in training: inference may turn images
        }
        if self.views is not None:
            final["views"] = {"volumes": self.views.volumes, "pixel_size": self.views.pixel_size}
        with atomic_path(out / "network.pt") as tmp:
            torch.save(final, tmp)
        with atomic_path(out / "history.csv") as tmp:
            history.to_csv(tmp, index=False, float_format="%.6g")
        loss_figure(history, s.param, self.baseline_error, out / "loss.png")
        self.ckpt_path.unlink(missing_ok=True)  # finished: a later run starts afresh
        log.info(
            "%s %s: %.1f M parameters; best epoch %d: validation error %.3g, trivial baseline %.3g",
            s.param, s.arch, n_parameters(self.model) / 1e6, int(best["epoch"]),
            best["val_metric"], self.baseline_error,
        )  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    dflt = TrainSettings(param="amplitudes")
    p.add_argument("--param", choices=PARAMS, required=True, help="parameter type to learn")
    p.add_argument("--labels", required=True, help="labelled particle STAR")
    p.add_argument("--split", required=True, help="split CSV")
    p.add_argument("--arch", default=dflt.arch, choices=ARCHS, help="network" + d)
    p.add_argument(
        "--angle-repr",
        default=dflt.angle_repr,
        choices=list(ANGLE_OUTPUTS),
        help="angle output" + d,
    )
    p.add_argument(
        "--box",
        type=int,
        default=dflt.box,
        help="working box: images are Fourier-cropped to it (default: the particles')",
    )
    p.add_argument("--pretrain", default=None, help="folder from `deephemnma synthesize`")
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=dflt.pretrain_epochs,
        help="epochs over the synthetic images" + d,
    )
    p.add_argument(
        "--epochs", type=int, default=dflt.epochs, help="epochs over the labelled images" + d
    )
    p.add_argument("--batch-size", type=int, default=dflt.batch_size, help="images per step" + d)
    p.add_argument("--lr", type=float, default=dflt.lr, help="peak learning rate" + d)
    p.add_argument("--weight-decay", type=float, default=dflt.weight_decay, help="AdamW's" + d)
    p.add_argument(
        "--patience",
        type=int,
        default=dflt.patience,
        help="early stop after this many epochs without improvement" + d,
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=dflt.augment,
        help="quarter-turn and integer-shift augmentation",
    )
    p.add_argument(
        "--augment-shift-px",
        type=int,
        default=dflt.augment_shift_px,
        help="largest augmentation shift in pixels" + d,
    )
    p.add_argument(
        "--views",
        action=argparse.BooleanOptionalAction,
        default=dflt.views,
        help="amplitudes: also feed the reference's views at each image's pose (needs --model, "
        "--modes; inference then needs the angle and shift networks' answers)",
    )
    p.add_argument(
        "--view-noise-deg",
        type=float,
        default=dflt.view_noise_deg,
        help="training views are rotated by |N(0, this)| degrees off the labelled pose" + d,
    )
    p.add_argument(
        "--view-noise-px",
        type=float,
        default=dflt.view_noise_px,
        help="and shifted by N(0, this) pixels per axis" + d,
    )
    p.add_argument(
        "--variance",
        action=argparse.BooleanOptionalAction,
        default=dflt.variance,
        help="amplitudes, shifts: also predict each value's variance (Gaussian likelihood), "
        "written by infer as a per-image uncertainty (default: amplitudes only; on the demo "
        "the shifts' head ranked errors no better than chance)",
    )
    p.add_argument("--model", default=None, help="model.npz (for --views)")
    p.add_argument("--modes", default=None, help="modes.npz (for --views)")
    p.add_argument("--sigma-angstrom", type=float, default=1.0, help="atom Gaussian width (Å)" + d)
    p.add_argument("--workers", type=int, default=dflt.workers, help="data-loading processes" + d)
    p.add_argument("--seed", type=int, default=dflt.seed, help="random seed" + d)
    p.add_argument(
        "--out-dir", required=True, help="network.pt, history.csv, loss.png, checkpoint.pt"
    )


def main(args: argparse.Namespace) -> None:
    flexible = (args.model, args.modes, args.sigma_angstrom) if args.model and args.modes else None
    settings = TrainSettings.from_args(args)
    Trainer(settings, args.labels, args.split, args.out_dir, args.pretrain, flexible).fit()
    if dist.is_initialized():
        dist.destroy_process_group()
