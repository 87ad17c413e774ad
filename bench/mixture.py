"""The whole workflow on imported particles of two states, given a model of one of them.

Simulates a mixture of open AK (4AKE, deformed along its own modes as the demo's particles) and
closed AK (1AKE, CA-superposed on 4AKE, undeformed): 64 px, 2.2 Å/px, SNR 0.1, CTF, uniform SO(3),
±2.5 px shifts; writes it as a RELION 3.1 particle STAR without poses and its stacks, with the
truth in a CSV beside it. Then runs the workflow on it as a user with real data would (the demo's
config, `particles.source: import`, the open model only as `structure`) and prints, per true
state: how many images HEMNMA aligned and flagged, how many end up trusted, how many the space
keeps, and the pose error of the trusted ones against the truth.

Usage: python bench/mixture.py [--n-images 1200] [--closed-fraction 0.5] [--out /tmp/mixture]
(about 7 minutes on 2 cores, most of it the workflow; --skip-run reports on an earlier run).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from conformations import reference

from deephemnma import geometry, hemnma, simulate
from deephemnma.io import optics_table, read_star, write_star
from deephemnma.mrc import StackWriter

REPO = Path(__file__).resolve().parents[1]


def make_particles(out: Path, n: int, closed_fraction: float, seed: int) -> None:
    """particles.star (no poses), stacks/ and truth.csv (image name, state, pose) in `out`."""
    open_ref = reference(REPO / "resources/adk_open.pdb", 3)
    closed_ref = hemnma.superpose(reference(REPO / "resources/adk_closed.pdb", 3), open_ref)
    cfg = simulate.SimulationSettings(snr=0.1, seed=seed)
    params = simulate.draw_parameters(n, np.arange(7, 10), cfg)
    rng = np.random.default_rng(seed + 10)
    state = np.zeros(n, dtype=int)
    state[rng.permutation(n)[: round(closed_fraction * n)]] = 1
    images = np.zeros((n, cfg.box, cfg.box), dtype=np.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    for s, ref in enumerate([open_ref, closed_ref]):
        rows = np.flatnonzero(state == s)
        if s == 1:
            params.loc[rows, [f"dhAmplitudeMode{k}" for k in (7, 8, 9)]] = 0.0
        for start in range(0, len(rows), 32):
            r = rows[start : start + 32]
            images[r] = simulate.render(ref.to(), params.iloc[r], cfg, gen)["final"].numpy()
    writer = StackWriter(out / "stacks", n, cfg.box, cfg.pixel_size, 10000)
    writer.write(images)
    names = [f"{i.split('@')[0]}@stacks/{Path(i.split('@')[1]).name}" for i in writer.names]
    ctf_cols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"]
    star = pd.DataFrame({"rlnImageName": names, **{c: params[c] for c in ctf_cols}})
    star["rlnOpticsGroup"] = 1
    optics = optics_table(cfg.pixel_size, cfg.box, cfg.voltage_kv, cfg.cs_mm, 0.1)
    write_star(out / "particles.star", optics.drop(columns="dhCtf"), star)
    truth = params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].assign(
        rlnImageName=names, state=state
    )
    truth.to_csv(out / "truth.csv", index=False)


def run_workflow(out: Path) -> float:
    """The demo's config, imported particles, the open model; returns the wall time."""
    cfg = out / "mixture.yaml"
    cfg.write_text(
        f"results: {out / 'results'}\n"
        "particles:\n  source: import\n  import:\n"
        f"    star: {out / 'particles.star'}\n",
        encoding="utf-8",
    )
    t0 = time.time()
    cmd = ["snakemake", "--cores", "2", "--configfile", str(cfg), "--quiet", "rules"]
    with open(out / "snakemake.log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def report(out: Path) -> None:
    res = out / "results"
    truth = pd.read_csv(out / "truth.csv").set_index("rlnImageName")
    hem = read_star(res / "hemnma/hemnma.star")["particles"]
    final = res / "network/hybrid.star"
    if not final.exists():
        final = res / "network/deephemnma.star"
    fin = read_star(final)["particles"]
    space = pd.read_csv(res / "space/space.csv")
    state_of = lambda t: truth.loc[t["dhSourceImageName"], "state"].to_numpy()
    h_state, f_state = state_of(hem), state_of(fin)
    kept = fin["dhTrusted"].to_numpy() == 1
    euler = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = geometry.euler_distance_deg(
        fin[euler].to_numpy(), truth.loc[fin["dhSourceImageName"], euler].to_numpy()
    )
    print(f"final STAR: {final.relative_to(res)}; space: {len(space)} images")
    print(
        "| state | images | HEMNMA aligned | flagged | trusted | trusted, pose ≤ 5° | median pose error, trusted |"
    )
    print("|---|---|---|---|---|---|---|")
    for s, name in enumerate(["open", "closed"]):
        m, hm, t = f_state == s, h_state == s, kept & (f_state == s)
        print(
            f"| {name} | {m.sum()} | {hm.sum()} | {int(hem['dhFlagged'][hm].sum())} | "
            f"{t.sum()} | {(err[t] <= 5).mean():.0%} | {np.median(err[t]) if t.any() else float('nan'):.1f}° |"
        )
    closed = f_state[kept] == 1
    print(
        f"the space: {kept.sum()} images, {closed.mean():.0%} closed "
        f"(input {(f_state == 1).mean():.0%})"
    )
    for md in ("hemnma/verdict.md", "network/quality.md", "network/trust.md", "network/hybrid.md"):
        if (res / md).exists():
            print(f"--- {md}\n" + (res / md).read_text(encoding="utf-8").strip())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=1200)
    p.add_argument("--closed-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("/tmp/mixture"))
    p.add_argument("--skip-run", action="store_true", help="report on an earlier run")
    a = p.parse_args()
    a.out = a.out.resolve()
    if not a.skip_run:
        a.out.mkdir(parents=True, exist_ok=True)
        make_particles(a.out, a.n_images, a.closed_fraction, a.seed)
        print(f"workflow: {run_workflow(a.out):.0f} s on {os.cpu_count()} CPU(s)")
    report(a.out)


if __name__ == "__main__":
    sys.exit(main())
