"""infer: stream every image through a trained network and write its estimates as STAR columns.

Images are read memory-mapped in contiguous chunks by DataLoader workers, preprocessed on the
device exactly as in training, and predicted in large batches (channels_last; bf16 weights on CUDA
and on CPUs with native bf16), so memory does not grow with the number of images beyond the
(n, outputs) result array. An amplitude network trained with views (`views.ModeViews`) is also
shown the reference's views at each image's pose, taken from the angle and shift networks'
answers (`--poses`). Each network's
per-image uncertainty, where it predicts one, goes to `_dhUncertainty<Type>`: the share of the
predicted orientation distribution farther than 20° from the answer (so3grid angles), the
predicted standard deviation averaged over modes (amplitudes), the predicted root-mean-square
shift error in pixels (shifts). With `--candidates K`, an so3grid angle network also writes the
answer's K - 1 next most probable well-separated orientations (`nets.grid_candidates`) as
`_dhAngleCandidate<j>Rot/Tilt/Psi`, j = 2 … K, which the hybrid refines from.
"""

from __future__ import annotations

import argparse
import logging
import pickle
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import geometry
from .files import InputError, require_file
from .flexible import FlexibleModel
from .hemnma import AlignSettings, Bound, make_target, model_ncc, refine
from .io import (
    AGREEMENT_COLUMN,
    DRIFT_COLUMNS,
    EULER_COLUMNS,
    ORIGIN_COLUMNS,
    ParticleSet,
    amplitude_column,
    candidate_columns,
    pose_columns,
    read_star,
    table_euler,
    table_shifts_px,
    uncertainty_column,
    write_star,
)
from .nets import (
    bf16_supported,
    build_network,
    decode_angles,
    decode_regression,
    grid_candidates,
    grid_uncertainty,
    preprocess,
    quarter_turn_mean,
    transform_images,
    unturn,
)
from .views import ModeViews, transform_views

log = logging.getLogger(__name__)


class Chunks(Dataset):
    """Contiguous chunks of images of a particle set (one DataLoader item per chunk)."""

    def __init__(self, ps: ParticleSet, chunk: int):
        self.images, self.n, self.chunk = ps.images, len(ps), chunk

    def __len__(self) -> int:
        return -(-self.n // self.chunk)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(
            self.images[slice(i * self.chunk, min((i + 1) * self.chunk, self.n))]
        )


def load_network(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A trained network (eval mode, batch norms folded, channels_last, on `device`) and its
    metadata."""
    try:
        meta = torch.load(require_file(path, "network"), map_location="cpu", weights_only=True)
        missing = [k for k in ("box", "particle_box", "angle_repr") if k not in meta]
        if missing:
            raise InputError(f"{path}: lacks {', '.join(missing)}: retrain it with this version")
        net = build_network(meta["arch"], meta["n_out"], meta.get("in_channels", 1))
        net.load_state_dict(meta["state_dict"])
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refusing to load (not a DeepHEMNMA network)") from exc
    except (KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{path}: not a DeepHEMNMA network ({exc})") from exc
    return ready_for_inference(net, device), meta


def ready_for_inference(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` in eval mode with each BatchNorm folded into its convolution (same outputs, ~20 %
    faster), channels_last, on `device`, its weights in bf16 where the device computes in it
    (as autocast would run its convolutions, without casting the weights at every call: ResNet-34
    at 128² on 2 cores, 314-333 images/s from memory-mapped stacks, 277-312 with autocast)."""
    net = fuse(net.eval()).to(device).to(memory_format=torch.channels_last)
    return net.to(torch.bfloat16) if bf16_supported(device) else net


def forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`net`'s float32 output for input `x`, given in the weights' precision, channels_last."""
    dtype = next(net.parameters()).dtype
    return net(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()


def check_geometry(meta: dict, ps: ParticleSet, path: str) -> None:
    """Refuse particles whose field of view differs from the training images'."""
    trained = meta["particle_box"] * meta["pixel_size"]
    given = ps.box * ps.pixel_size
    if abs(trained - given) > 1e-3 * trained or ps.box < meta["box"]:
        raise InputError(
            f"{ps.star}: {ps.box} px at {ps.pixel_size:g} Å/px, but {path} was trained on "
            f"{meta['particle_box']} px at {meta['pixel_size']:g} Å/px"
        )
    if ps.box != meta["box"]:
        log.info("images are Fourier-cropped from %d to the network's %d px", ps.box, meta["box"])


def read_poses(paths: list[str], ps: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """Euler angles (n, 3) and shifts (n, 2, pixels) of every particle of `ps`, in its row
    order, from STAR files that together hold them (e.g. the angle and shift networks')."""
    table = ps.particles[["rlnImageName"]]
    for path in paths:
        t = read_star(require_file(path, "pose STAR"), ["rlnImageName"])["particles"]
        cols = [c for c in (*EULER_COLUMNS, *ORIGIN_COLUMNS) if c in t and c not in table]
        table = table.merge(t[["rlnImageName", *cols]], on="rlnImageName", how="left")
    missing = [c for c in (*EULER_COLUMNS, *ORIGIN_COLUMNS) if c not in table]
    if missing:
        raise InputError(f"{', '.join(paths)}: no {', '.join(missing)} columns")
    if table[[*EULER_COLUMNS, *ORIGIN_COLUMNS]].isna().any().any():
        raise InputError(f"{', '.join(paths)}: poses missing for some images of {ps.star}")
    return table_euler(table), table_shifts_px(table, ps.pixel_size)


def uncertainty(param: str, sd: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Per-image uncertainty (n,) of a regression network from its predicted standard
    deviations (n, k): the mean over modes (amplitude units), or the root-mean-square shift
    error sqrt(σx² + σy²) (pixels); NaN without a variance head. (Angles: `decode_angles`.)"""
    if sd is None:
        return torch.full((n,), float("nan"), device=device)
    return sd.norm(dim=-1) if param == "shifts" else sd.mean(-1)


def turned_scores(
    net: torch.nn.Module,
    imgs: torch.Tensor,
    box: int,
    turns: int,
    views: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The network's outputs for images (B, D, D) turned in plane by 90° × k, k = 1 … turns - 1
    (exact pixel permutations, as in training's augmentation); their `views` (B, C, d, d), if
    the network sees them, turned with them."""
    out, zero = [], torch.zeros(len(imgs), 2, device=imgs.device)
    for k in range(1, turns):
        k_all = torch.full((len(imgs),), k, device=imgs.device)
        x = preprocess(transform_images(imgs, k_all, zero), box)
        if views is not None:
            x = torch.cat([x, transform_views(views, k_all, zero).to(x.dtype)], 1)
        out.append(forward(net, x))
    return out


def turned_regression(
    net: torch.nn.Module,
    imgs: torch.Tensor,
    meta: dict,
    answer: tuple[torch.Tensor, torch.Tensor | None],
    turns: int,
    views: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A shift or amplitude network's answer (values (B, k), standard deviations or None)
    averaged with its answers for the images turned by 90° × k, k = 1 … turns - 1: shifts each
    turned back (`unturn`), amplitudes as they are (a turn leaves them unchanged). The demo's
    shift network on the 900 images HEMNMA did not align: 0.66 → 0.62 px; its amplitude network
    on all 1,200 images: 51.8 → 50.6 (36.2 instead of 38.2 at the true poses). With a variance
    head, the standard deviation per value is sqrt(mean σ² + the answers' variance): the
    network's own spread and the turned copies' disagreement."""
    values, var = [answer[0]], [None if answer[1] is None else answer[1] ** 2]
    mean, std = meta["mean"].to(imgs.device), meta["std"].to(imgs.device)
    back = unturn if meta["param"] == "shifts" else lambda v, _: v  # per axis: x and y swap
    for k, y in enumerate(turned_scores(net, imgs, meta["box"], turns, views), 1):
        v, d = decode_regression(y, mean, std)
        values.append(back(v, k))
        var.append(None if d is None else back(d, k) ** 2)
    stacked = torch.stack(values)
    if answer[1] is None:
        return stacked.mean(0), None
    spread = stacked.var(0, unbiased=False)
    return stacked.mean(0), (torch.stack(var).mean(0) + spread).sqrt()


def default_batch(device: torch.device) -> int:
    """Images per forward pass: 64 on a CPU, whose caches favour small batches (ResNet-34 at
    128², 2 cores, bf16 autocast: 277-312 images/s against 266-277 with 256), 256 on a GPU."""
    return 256 if device.type == "cuda" else 64


@torch.no_grad()
def predict(
    net: torch.nn.Module,
    meta: dict,
    ps: ParticleSet,
    device: torch.device,
    batch: int,
    workers: int,
    poses: tuple[np.ndarray, np.ndarray] | None = None,
    turns: int = 4,
    candidates: int = 1,
) -> np.ndarray:
    """Predictions for every image, in row order, then their uncertainty (NaN where the network
    predicts none): amplitudes (n, K + 1), shifts (n, 3) or Euler angles (n, 4) — see
    `uncertainty`. `poses` (Euler angles, shifts in pixels): for an amplitude network with
    views. so3grid angle networks also see each image turned in plane by 90°, 180°, 270° (up
    to `turns` - 1 of them): the answer decodes their mean distribution
    (`nets.quarter_turn_mean`), the uncertainty measures each one's mass away from it
    (`nets.grid_uncertainty`); with `candidates` > 1 the Euler angles of the next
    `candidates` - 1 orientation candidates (`nets.grid_candidates`) follow, (n, 4 + 3 (c - 1)).
    Shift and amplitude networks average their (turned-back) answers (`turned_regression`). Networks
    trained without augmentation never saw turned images: `turns` is 1 for them."""
    loader = DataLoader(
        Chunks(ps, batch), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda"
    )
    mean, std = meta["mean"].to(device), meta["std"].to(device)
    angles = meta["param"] == "angles"
    width = 4 + 3 * (candidates - 1) if angles else len(meta["mean"]) + 1
    out = np.empty((len(ps), width), dtype=np.float32)
    pos = 0
    turns = turns if meta.get("augment", True) else 1
    views = ModeViews(**meta["views"]) if "views" in meta else None
    if views is not None and poses is None:
        raise InputError("this amplitude network sees views: give the images' poses (--poses)")
    ctf = ps.ctf_params() if ps.has_ctf else None
    turned = angles and meta["angle_repr"] == "so3grid" and turns > 1
    for imgs in tqdm(loader, desc=f"infer {meta['param']}", unit="batch", mininterval=10):
        imgs = imgs.to(device, non_blocking=True).float()
        x = preprocess(imgs, meta["box"])
        v = None
        if views is not None:
            rows = np.arange(pos, pos + len(x))
            v = views.of_particles(poses[0][rows], poses[1][rows], ps.box, ctf, rows, device)
            x = torch.cat([x, v.to(x.dtype)], 1)
        y = forward(net, x)
        if angles:
            scores = y * std + mean
            rot, unc = decode_angles(scores, meta["angle_repr"])
            if turned:
                turned_all = [y, *turned_scores(net, imgs, meta["box"], turns)]
                scores = quarter_turn_mean(turned_all)
                rot, _ = decode_angles(scores, meta["angle_repr"])
                unc = grid_uncertainty(turned_all, rot)
            euler = lambda m: geometry.matrix_to_euler(m.double()).float()
            y = torch.cat([euler(rot), unc[:, None]], 1)
            if candidates > 1:
                others = grid_candidates(torch.log_softmax(scores, -1), rot, candidates)[:, 1:]
                y = torch.cat([y, euler(others).flatten(1)], 1)
        else:
            y, sd = decode_regression(y, mean, std)
            if turns > 1:
                y, sd = turned_regression(net, imgs, meta, (y, sd), turns, v)
            y = torch.cat([y, uncertainty(meta["param"], sd, len(y), device)[:, None]], 1)
        out[pos : pos + len(y)] = y.cpu().numpy()
        pos += len(y)
    return out


def prediction_table(
    meta: dict, names: pd.Series, values: np.ndarray, pixel_size: float
) -> pd.DataFrame:
    """STAR columns of one parameter type's predictions."""
    t = pd.DataFrame({"rlnImageName": names.to_numpy()})
    if meta["param"] == "amplitudes":
        for j, k in enumerate(meta["mode_numbers"]):
            t[amplitude_column(int(k))] = values[:, j]
    elif meta["param"] == "shifts":
        t = t.assign(**pose_columns(shifts_px=values[:, :2], pixel_size=pixel_size))
    else:
        t = t.assign(**pose_columns(euler=values[:, :3]))
    n_values = {"angles": 3, "shifts": 2}.get(meta["param"], len(meta["mode_numbers"]))
    if values.shape[1] > n_values and not np.isnan(values[:, n_values]).all():
        t[uncertainty_column(meta["param"])] = values[:, n_values]
    if meta["param"] == "angles":  # orientation candidates after the uncertainty
        for j in range((values.shape[1] - 4) // 3):
            t[candidate_columns(j + 2)] = values[:, 4 + 3 * j : 7 + 3 * j]
    return t


@dataclass
class ModelCheck:
    """How the flexible model judges each image's answer (pose, shift, amplitudes), no label
    needed: `agreement` (n,), the CTF-weighted correlation HEMNMA maximises (`hemnma.model_ncc`)
    of the image with the model at the answer, low when the answer does not explain the image;
    `shift_drift` (pixels) and `amplitude_drift` (mean over modes) (n,), how far a short local
    refinement from the answer moves them, large when they are off (they rank the networks'
    shift and amplitude errors better than the networks' own uncertainty)."""

    agreement: np.ndarray
    shift_drift: np.ndarray
    amplitude_drift: np.ndarray


def check_answers(
    ps: ParticleSet,
    model: FlexibleModel,
    poses: tuple[np.ndarray, np.ndarray],
    amplitudes: np.ndarray,
    box: int,
    device: torch.device,
    sigma_angstrom: float = 1.0,
    iterations: int = 30,
    batch: int = 64,
) -> ModelCheck:
    """`ModelCheck` of the answers (`poses`: Euler angles, shifts in pixels; `amplitudes` (n, K))
    at the working `box`, the model's atoms of width `sigma_angstrom`; the drifts after
    `iterations` steps of HEMNMA's local refinement (`hemnma.refine`) within the default local
    bound (`AlignSettings.local_max_*`)."""
    model, ctf = model.to(device), ps.ctf_params()
    lr = AlignSettings.local_lr_amplitude
    s = AlignSettings(sigma_angstrom=sigma_angstrom, lr_amplitude=lr)
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)
    out: list[list[np.ndarray]] = [[np.zeros(0)] for _ in range(3)]
    for first in range(0, len(ps), batch):
        r = np.arange(first, min(first + batch, len(ps)))
        target = make_target(f32(ps.images[r]), ctf, r, min(box, ps.box), ps.pixel_size, ps.has_ctf)
        rot = geometry.euler_to_matrix(f32(poses[0][r]))
        shift, amp = f32(poses[1][r]), f32(amplitudes[r])
        with torch.no_grad():
            out[0].append(model_ncc(target, model, rot, shift, amp, s, ps.box).cpu().numpy())
        bound = Bound(s.local_max_angle_deg, s.local_max_shift_px, shift)
        moved = refine(target, model, rot, shift, amp, iterations, s, ps.box, bound=bound)
        out[1].append((moved[1] - shift).norm(dim=1).cpu().numpy())
        out[2].append((moved[2] - amp).abs().mean(1).cpu().numpy())
    return ModelCheck(*(np.concatenate(o) for o in out))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", required=True, help="network.pt from train")
    p.add_argument("--particles", required=True, help="all particles (STAR)")
    p.add_argument(
        "--poses",
        nargs="+",
        default=None,
        help="STARs holding every image's angles and shifts (amplitude networks with views)",
    )
    p.add_argument(
        "--turns",
        type=int,
        choices=[1, 2, 3, 4],
        default=4,
        help="also infer the images turned by 90° steps; the answer decodes the mean of their "
        "distributions (so3grid angles, whose uncertainty is their spread around it) or is the "
        "mean of the turned-back shifts or of the amplitudes "
        "(default: %(default)s: 0°, 90°, 180°, 270°; 1: the image as given only)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model.npz (with --modes, for an amplitude network with --poses): write each "
        "image's agreement with the model at the answer (_dhModelAgreement) and how far a short "
        "local refinement moves its shift and amplitudes (_dhModelShiftDrift, pixels; "
        "_dhModelAmplitudeDrift)",
    )
    p.add_argument("--modes", default=None, help="modes.npz of --model")
    p.add_argument(
        "--sigma-angstrom", type=float, default=1.0, help="--model's atom Gaussian width (Å)"
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="so3grid angles: also write the next best well-separated orientations, this many "
        "in all with the answer (_dhAngleCandidate<j>Rot etc.; the hybrid refines from each)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per forward pass (default: 64 on a CPU, whose caches favour small batches; "
        "256 on a GPU)",
    )
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--out", required=True, help="STAR with the predicted columns")


def check_of(
    args: argparse.Namespace,
    meta: dict,
    ps: ParticleSet,
    poses: tuple[np.ndarray, np.ndarray] | None,
    values: np.ndarray,
    device: torch.device,
) -> ModelCheck:
    """`check_answers` of an amplitude network's answers with `--model`, `--modes`."""
    if meta["param"] != "amplitudes" or poses is None or args.modes is None:
        raise InputError("--model (the agreement) needs --modes, an amplitude network, --poses")
    model = FlexibleModel.load(require_file(args.model, "model"), require_file(args.modes, "modes"))
    if list(model.mode_numbers) != list(meta["mode_numbers"]):
        raise InputError(
            f"{args.modes}: modes {list(model.mode_numbers)}, but "
            f"{args.network} predicts modes {list(meta['mode_numbers'])}"
        )
    k = len(meta["mode_numbers"])
    c = check_answers(ps, model, poses, values[:, :k], meta["box"], device, args.sigma_angstrom)
    log.info(
        "the model at the answers: median agreement %.3f; under a short local refinement, "
        "median shift drift %.2f px, amplitude drift %.1f",
        *(np.median(v) for v in (c.agreement, c.shift_drift, c.amplitude_drift)),
    )
    return c


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, meta = load_network(args.network, device)
    ps = ParticleSet(require_file(args.particles, "particle STAR"))
    check_geometry(meta, ps, args.network)
    poses = read_poses(args.poses, ps) if args.poses else None
    so3grid = (meta["param"], meta["angle_repr"]) == ("angles", "so3grid")
    if args.candidates < 1 or (args.candidates > 1 and not so3grid):
        raise InputError(
            f"{args.network}: --candidates {args.candidates} needs an so3grid angle network "
            f"(this one: {meta['param']}, {meta['angle_repr']}) and a count of at least 1"
        )
    batch = args.batch or default_batch(device)
    values = predict(net, meta, ps, device, batch, args.workers, poses, args.turns, args.candidates)
    table = prediction_table(meta, ps.particles["rlnImageName"], values, ps.pixel_size)
    if args.model:
        c = check_of(args, meta, ps, poses, values, device)
        table[AGREEMENT_COLUMN] = c.agreement
        table[DRIFT_COLUMNS["shifts"]] = c.shift_drift
        table[DRIFT_COLUMNS["amplitudes"]] = c.amplitude_drift
    write_star(args.out, ps.optics, table)
    log.info("inferred %s for %d images", meta["param"], len(ps))
