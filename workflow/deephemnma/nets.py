"""The networks, one per parameter type: ResNet-18/34/50/101 with a one-channel stem (the paper's),
or a small plain ConvNet that trains ~6x faster on a CPU at a 32-px working box; and the input
preprocessing every network shares in training and inference."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from . import geometry
from .imaging import fourier_crop

# Orientation outputs. "so3grid": scores over GRID_SIZE super-Fibonacci rotations (about 12.4°
# between neighbours), trained towards a soft target (a Gaussian of GRID_SIGMA_DEG around the true
# rotation) and decoded as the weighted mean within GRID_RADIUS_DEG of the best score: classification
# keeps several hypotheses where regression averages them into a wrong answer; the probability mass
# farther than GRID_WRONG_DEG from the answer is its uncertainty. "6d" (Zhou et al., 2019),
# "quaternion" and "euler" regress (the paper's ablation, Table S1).
GRID_SIZE = 4096
GRID_SIGMA_DEG = 15.0
GRID_RADIUS_DEG = 45.0
GRID_WRONG_DEG = 20.0
# Orientation candidates of a local refinement (hybrid): the answer, then the most probable grid
# rotations each at least this far from the candidates before them.
CANDIDATE_SEPARATION_DEG = 30.0
# Regression networks with a variance head output a log-variance per value after the values
# (standardised units), clamped to ±LOGVAR_MAX.
LOGVAR_MAX = 10.0
ANGLE_OUTPUTS = {"so3grid": GRID_SIZE, "6d": 6, "quaternion": 4, "euler": 3}

LAYERS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = _downsample(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.down = _downsample(cin, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.down(x))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet trunk (`in_channels` input) + MLP head with `n_out` outputs."""

    def __init__(self, arch: str, n_out: int, in_channels: int = 1, head_width: int = 1024):
        super().__init__()
        kind, counts = LAYERS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], 64
        for i, n in enumerate(counts):
            width = 64 * 2**i
            for j in range(n):
                layers.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin, head_width),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(head_width, n_out),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConvNet(nn.Module):
    """Four stages of 3x3 conv-BN-ReLU at `width` x 1, 2, 4, 8 channels (two convs then a 2x2
    max-pool in the first three), global average pool, MLP head with `n_out` outputs."""

    def __init__(self, width: int, n_out: int, in_channels: int = 1, head_width: int = 512):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        layers, cin = [], in_channels
        for i in range(3):
            cout = width * 2**i
            layers += [*conv(cin, cout), *conv(cout, cout), nn.MaxPool2d(2)]
            cin = cout
        layers += conv(cin, 8 * width)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(8 * width, head_width), nn.ReLU(inplace=True), nn.Linear(head_width, n_out)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


CONVNETS = {"convnet16": 16, "convnet32": 32}
ARCHS = [*LAYERS, *CONVNETS]


def build_network(arch: str, n_out: int, in_channels: int = 1) -> nn.Module:
    """A network of one of `ARCHS` with `n_out` outputs and `in_channels` input channels."""
    if arch in CONVNETS:
        return ConvNet(CONVNETS[arch], n_out, in_channels)
    return ResNet(arch, n_out, in_channels)


def n_outputs(param: str, angle_repr: str, n_modes: int, variance: bool = False) -> int:
    """Outputs of the network of one parameter type (`variance`: amplitudes and shifts also
    predict a log-variance per value)."""
    n = {"amplitudes": n_modes, "shifts": 2}.get(param)
    return ANGLE_OUTPUTS[angle_repr] if n is None else n * (2 if variance else 1)


@functools.cache
def _grid() -> torch.Tensor:
    return torch.from_numpy(geometry.super_fibonacci_matrices(GRID_SIZE)).float()


def rotation_grid(device: torch.device | str = "cpu") -> torch.Tensor:
    """The so3grid output rotations (GRID_SIZE, 3, 3), RELION matrices."""
    return _grid().to(device)


def grid_targets(rot: torch.Tensor) -> torch.Tensor:
    """Soft so3grid targets (B, GRID_SIZE) of rotations (B, 3, 3)."""
    ang = geometry.grid_angles(rot.float(), rotation_grid(rot.device))
    return torch.softmax(-0.5 * (ang / math.radians(GRID_SIGMA_DEG)) ** 2, -1)


def decode_angles(values: torch.Tensor, angle_repr: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION matrices (n, 3, 3) from angle-network outputs (n, n_out), and for so3grid an
    uncertainty: the share of the predicted distribution (softmax) farther than GRID_WRONG_DEG
    from the answer (NaN for the regressed representations; the soft training target alone puts
    0.71 there, a flat score 0.997). On the demo's trained network it ranks the actual errors
    better than the distribution's spread, its entropy or its second mode (README, networks)."""
    v = values
    spread = torch.full(v.shape[:1], math.nan, device=v.device)
    if angle_repr == "so3grid":
        rot, _ = geometry.grid_decode(v.float(), rotation_grid(v.device), GRID_RADIUS_DEG)
        return rot, grid_uncertainty([v], rot)
    if angle_repr == "6d":
        return geometry.sixd_to_matrix(v), spread
    if angle_repr == "quaternion":
        return geometry.quaternion_to_matrix(v), spread
    return geometry.euler_to_matrix(v), spread


def grid_candidates(log_prob: torch.Tensor, answer: torch.Tensor, k: int) -> torch.Tensor:
    """`k` orientation candidates (B, k, 3, 3) per image from so3grid log-probabilities
    (B, GRID_SIZE) and the decoded answers (B, 3, 3): the answer first, then the most probable
    grid rotations, each more than CANDIDATE_SEPARATION_DEG from the candidates chosen before it
    (`geometry.separated`; the last one repeated when fewer qualify)."""
    grid = rotation_grid(log_prob.device)
    top = log_prob.topk(min(64 * k, GRID_SIZE), -1).indices  # best first
    mats = torch.cat([answer[:, None].to(grid.dtype), grid[top]], 1)  # (B, 1 + T, 3, 3)
    quat = geometry.euler_to_quaternion(geometry.matrix_to_euler(mats.double())).float()
    pick = geometry.separated(quat, k, CANDIDATE_SEPARATION_DEG)
    return mats[torch.arange(len(mats), device=mats.device)[:, None], pick]


def grid_uncertainty(scores: list[torch.Tensor], rot: torch.Tensor) -> torch.Tensor:
    """so3grid uncertainty (B,) of answers `rot` (B, 3, 3): the softmax mass of `scores[k]`
    (B, GRID_SIZE) farther than GRID_WRONG_DEG from the answer, averaged over k, where
    `scores[k]` are the network's scores for the image turned in plane by 90° × k (as
    `train.transform_images` turns it: psi + 90° k, the answer turned by Rz(90° k)). The turns
    add the network's disagreement with itself to the spread of its distribution."""
    grid = rotation_grid(rot.device)
    total = torch.zeros(rot.shape[:1], device=rot.device)
    for k, v in enumerate(scores):
        turn = geometry.euler_to_matrix(torch.tensor([0.0, 0.0, 90.0 * k], dtype=torch.float64))
        near = geometry.grid_angles(turn.to(rot) @ rot, grid) < math.radians(GRID_WRONG_DEG)
        total += 1.0 - (torch.softmax(v.float(), -1) * near).sum(-1)
    return total / len(scores)


def decode_regression(
    values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values (n, k) in label units from a regression network's outputs (n, k) or (n, 2k) with
    a variance head, and then the predicted standard deviations (n, k) in label units (None
    without a variance head). `mean`, `std` (k,): the target standardisation."""
    k = mean.shape[-1]
    mu = values[:, :k] * std + mean
    if values.shape[-1] != 2 * k:
        return mu, None
    return mu, torch.exp(0.5 * values[:, k:].clamp(-LOGVAR_MAX, LOGVAR_MAX)) * std


def n_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def preprocess(images: torch.Tensor, box: int) -> torch.Tensor:
    """(B, D, D) -> (B, 1, box, box): Fourier-cropped to the working box (a low-pass at its
    Nyquist frequency), then each image to zero mean and unit variance."""
    images = fourier_crop(images, box)
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


def turn_shifts(shifts: torch.Tensor, alpha_deg: torch.Tensor | float) -> torch.Tensor:
    """Shifts (B, 2) as (x, y) of images turned in plane by α (`transform_images`' sense, per
    image or one for all): Rz(α) = [[cos α, sin α], [-sin α, cos α]] applied to (x, y)."""
    a = torch.deg2rad(torch.as_tensor(alpha_deg, dtype=shifts.dtype, device=shifts.device))
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack(
        [c * shifts[:, 0] + s * shifts[:, 1], -s * shifts[:, 0] + c * shifts[:, 1]], -1
    )


def unturn(shifts: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """Shifts (B, 2) of images turned by 90° × quarter_turns moved back to the unturned images
    (the inverse of the labels' turn in training, `train.transform_labels`)."""
    return turn_shifts(shifts, -90.0 * quarter_turns)


@functools.cache
def _quarter_turn_maps() -> torch.Tensor:
    """(4, GRID_SIZE): for images turned by k quarter turns, the grid point nearest to the
    rotation of the unturned image that each grid point of the turned image stands for."""
    grid = _grid()
    maps = [torch.arange(len(grid))]
    for k in (1, 2, 3):
        a = math.radians(90.0 * k)
        turn = torch.tensor(
            [[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]
        )
        back = torch.einsum("ji,kjl->kil", turn, grid)  # turnᵀ g: the unturned image's rotation
        maps.append(torch.cat([geometry.grid_angles(b, grid).argmin(-1) for b in back.split(512)]))
    return torch.stack(maps)


def quarter_turn_mean(scores: list[torch.Tensor]) -> torch.Tensor:
    """so3grid log-probabilities (B, GRID_SIZE) of images from the network's scores for them
    turned in plane by 90° × k (`scores[k]`, k = 0 … 3 or fewer; test-time augmentation):
    turning an image by α turns its rotation to Rz(α)·R (psi + α), so each turned copy's
    probabilities are moved back to the grid point nearest Rz(α)ᵀ·g before the mean."""
    maps = _quarter_turn_maps().to(scores[0].device)
    total = 0
    for k, v in enumerate(scores):
        prob = torch.softmax(v.float(), -1)
        total = total + torch.zeros_like(prob).index_add_(1, maps[k], prob)
    return torch.log((total / len(scores)).clamp_min(1e-12))


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 is fast here (CUDA, or a CPU with native bf16 in oneDNN): training's
    autocast and inference's bf16 weights."""
    if device.type == "cuda":
        return True
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
