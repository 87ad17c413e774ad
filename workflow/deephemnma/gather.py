"""gather: merge the aligned HEMNMA shards into one STAR, with a per-image quality flag.

An image whose cost is far above the population's (robust z-score `dhCostZ` from the median and
MAD, per reference when there are several) is one the model does not explain: `dhFlagged` = 1;
its values are not used as network labels nor in the conformational space, and the verdict
(`--out-md`, first in the report) says how many there are.
When the costs fall in two clearly separated groups (a two-component Gaussian mixture whose
components are at least `SEPARATION` apart in Ashman's D and whose density dips between them to at
most `VALLEY` of its height at the lower peak), e.g. half the particles in a state the model does
not reach, the median and MAD are those of the lower group: a population that is half unexplained
does not make its unexplained half typical.
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import pandas as pd

from .figures import pyplot, save_figure
from .files import InputError, atomic_path
from .io import FLAG_COLUMN, read_star, write_star

log = logging.getLogger(__name__)


SEPARATION = 3.0  # Ashman's D between the two cost groups for the lower one to be the baseline
VALLEY = 0.5  # and the mixture's density between them at most this share of its lower peak
MIN_GROUP = 20  # images in each group (and 5× that in all) before a split is considered
WARN_SHARE = 0.05  # a verdict warns (⚠️) when more than this share of images is not explained


def robust_z(cost: np.ndarray, baseline: np.ndarray | None = None) -> np.ndarray:
    """(cost - median) / (1.4826 · MAD), median and MAD of `baseline` (default: all costs): a
    z-score that outliers do not inflate."""
    cost = np.asarray(cost, dtype=np.float64)
    if len(cost) == 0:
        return cost
    ref = cost if baseline is None else np.asarray(baseline, dtype=np.float64)
    med = np.median(ref)
    mad = 1.4826 * np.median(np.abs(ref - med))
    return (cost - med) / max(mad, 1e-12)


def explained_group(cost: np.ndarray) -> np.ndarray:
    """Boolean mask of the costs that set the baseline: the lower of two clearly separated groups
    (Ashman's D ≥ SEPARATION of a two-component Gaussian mixture, and a valley between them: its
    density falls to at most VALLEY of the lower of its values at the two means), else all of them.
    """
    cost = np.asarray(cost, dtype=np.float64)
    everything = np.ones(len(cost), dtype=bool)
    if len(cost) < 5 * MIN_GROUP:
        return everything
    from scipy.stats import norm
    from sklearn.mixture import GaussianMixture

    x = robust_z(cost)[:, None]  # unit scale for the mixture's regularisation
    gm = GaussianMixture(2, n_init=3, random_state=0).fit(x)
    mu, var, w = gm.means_[:, 0], gm.covariances_.reshape(2), gm.weights_
    d = math.sqrt(2.0) * abs(mu[0] - mu[1]) / math.sqrt(var[0] + var[1])
    between = np.linspace(mu.min(), mu.max(), 200)
    density = sum(w[i] * norm.pdf(between, mu[i], math.sqrt(var[i])) for i in range(2))
    valley = density.min() / min(density[0], density[-1])
    low = gm.predict(x) == int(np.argmin(mu))
    if d < SEPARATION or valley > VALLEY or min(low.sum(), (~low).sum()) < MIN_GROUP:
        return everything
    return low


def cost_z(
    parts: pd.DataFrame, baseline: pd.DataFrame | None = None, originals: int | None = None
) -> np.ndarray:
    """Robust z-score of each image's `dhCost` against the median and MAD of the explained group
    of `baseline`'s costs (default: `parts` itself), per `dhReference` when both tables have the
    column; with a separate baseline, a reference on which it has fewer than MIN_GROUP images
    is measured against all of its costs. References above `originals` (fitted by reference
    updates from the first) are measured against the first one's costs: the images a fitted
    reference takes are explained only if as well as the model explains its own."""
    base = parts if baseline is None else baseline
    cost, ref_cost = parts["dhCost"].to_numpy(float), base["dhCost"].to_numpy(float)
    z = np.full(len(cost), np.nan)
    if "dhReference" in parts and "dhReference" in base:
        ref = base["dhReference"].to_numpy()
        for r, rows in parts.groupby("dhReference").indices.items():
            fitted = originals is not None and r > originals
            own = ref_cost[ref == (1 if fitted else r)]
            if baseline is None or len(own) >= MIN_GROUP:
                z[rows] = robust_z(cost[rows], own[explained_group(own)])
    left = np.isnan(z)
    if left.any():
        z[left] = robust_z(cost[left], ref_cost[explained_group(ref_cost)])
    return z


def cost_figure(cost: pd.Series, flagged: pd.Series, path: str) -> None:
    """Histogram of the HEMNMA cost (1 - normalised correlation) per image, flagged in red."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.histogram_bin_edges(cost, bins=40)
    ax.hist(cost[~flagged], bins=bins, color="tab:blue", label="explained")
    ax.hist(cost[flagged], bins=bins, color="tab:red", label=f"flagged ({int(flagged.sum())})")
    ax.set_xlabel("HEMNMA cost (1 - normalised correlation)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="+", required=True, help="aligned HEMNMA shard STARs")
    p.add_argument("--out", required=True, help="gathered HEMNMA STAR")
    p.add_argument("--out-figure", required=True, help="cost histogram (PNG)")
    p.add_argument("--out-md", default=None, help="the flag's verdict (Markdown)")
    p.add_argument(
        "--originals",
        type=int,
        default=None,
        help="references given by the user (_dhReference above this: fitted from the first, "
        "whose costs they are measured against; default: each against its own)",
    )
    p.add_argument(
        "--flag-z",
        type=float,
        default=3.0,
        help="flag images whose cost robust z-score (against the lower of two clearly separated "
        "cost groups, if any) exceeds this",
    )


def flag_verdict(flagged: int, n: int, flag_z: float) -> str:
    """The quality flag's verdict, one Markdown line in plain words."""
    share = flagged / max(n, 1)
    line = (
        f"- {'⚠️' if share > WARN_SHARE else '✅'} HEMNMA: {flagged} of {n} images "
        f"({100 * share:.1f} %) are not explained by the model (cost robust z-score above "
        f"{flag_z:g}, `_dhFlagged 1`): their poses and amplitudes are not trusted, not used as "
        "network labels nor in the conformational space."
    )
    if share > WARN_SHARE:
        line += (
            " So large a share suggests particles in a state the normal modes do not reach: "
            "give that state as another structure (`structure`), or let reference updates fit "
            "one (`hemnma.reference_update.iterations`)."
        )
    return line


def main(args: argparse.Namespace) -> None:
    blocks = [read_star(s, required=["rlnImageName", "dhCost"]) for s in args.shards]
    optics = blocks[0]["optics"]
    for s, b in zip(args.shards, blocks, strict=True):
        if not b["optics"].equals(optics):
            raise InputError(f"{s}: optics table differs from {args.shards[0]}")
    parts = pd.concat([b["particles"] for b in blocks], ignore_index=True)
    parts["dhCostZ"] = cost_z(parts, originals=args.originals)
    parts[FLAG_COLUMN] = (parts["dhCostZ"] > args.flag_z).astype(int)
    flagged = int(parts[FLAG_COLUMN].sum())
    write_star(args.out, optics, parts)
    cost_figure(parts["dhCost"], parts[FLAG_COLUMN].astype(bool), args.out_figure)
    if args.out_md:
        with atomic_path(args.out_md) as tmp:
            tmp.write_text(
                f"# HEMNMA verdict\n\n{flag_verdict(flagged, len(parts), args.flag_z)}\n",
                encoding="utf-8",
            )
    log.info("gathered %d aligned particles from %d shards", len(parts), len(args.shards))
    log.info(
        "flagged %d of %d images (cost robust z > %g): the model does not explain them",
        flagged,
        len(parts),
        args.flag_z,
    )
