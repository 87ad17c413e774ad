"""Memory at scale: peak memory per stage for 10⁴ and 10⁵ particles at 64 px.

Usage: python bench/scale.py [--sizes 10000,100000] [--workers 2]

Per size: `deephemnma simulate` (CTF, SNR 0.1, projected at 1× rather than 2× oversampled to save
time, streamed into stacks), `infer` with an untrained ResNet-18 amplitude network on 32-px inputs
(Fourier-cropped from 64 px; the point is memory, not accuracy) reading the stacks memory-mapped,
`space` (PCA + k-means on the simulated amplitudes) and `reconstruct` of group 0. Each stage runs
in its own process; a thread samples /proc/self/status every 20 ms and reports the peak of the
process's anonymous memory (RssAnon: what the stage allocates) and of its whole resident set
(VmHWM, which also counts pages of memory-mapped stacks that were read), plus the peak of its
children (DataLoader workers). Prints one table: per stage, the peaks at each size and their
ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from deephemnma.io import count_star_rows

REPO = Path(__file__).resolve().parents[1]

# run inside each stage's process: sample memory, run the CLI verb, print one JSON line
STAGE = r"""
import json, resource, sys, threading, time
peak = {"RssAnon": 0, "VmHWM": 0}
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in peak:
            out[k] = int(v.split()[0])
    return out
def sample():
    while True:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from deephemnma.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
for k, v in status().items():
    peak[k] = max(peak[k], v)
peak["children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
peak["wall"] = time.perf_counter() - t
print("STAGE " + json.dumps(peak))
sys.exit(rc)
"""


def stage(*args: str, cwd: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", STAGE, *args], cwd=cwd, capture_output=True, text=True
    )
    if r.returncode:
        raise RuntimeError(f"{args[0]} failed: {r.stderr.strip()[-1000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("STAGE ")][-1]
    return json.loads(line[6:])


def untrained_network(path: Path, mode_numbers: list[int], pixel_size: float) -> None:
    """An amplitude network in train's format with random weights."""
    from deephemnma.nets import ResNet

    n = len(mode_numbers)
    torch.save(
        {
            "state_dict": ResNet("resnet18", n).state_dict(),
            "arch": "resnet18",
            "param": "amplitudes",
            "angle_repr": "6d",
            "n_out": n,
            "mean": torch.zeros(n),
            "std": torch.ones(n),
            "box": 32,
            "particle_box": 64,
            "pixel_size": pixel_size,
            "mode_numbers": mode_numbers,
        },
        path,
    )


def run_size(root: Path, n: int, workers: int) -> dict[str, dict]:
    d = root / f"n{n}"
    d.mkdir()
    m = ["--model", str(root / "model.npz"), "--modes", str(root / "modes.npz")]
    res = {}
    res["simulate"] = stage(
        "simulate", *m, "--n-images", str(n), "--box", "64", "--pixel-size", "2.2",
        "--snr", "0.1", "--oversample", "1", "--batch", "64", "--out-star", "p.star",
        "--out-stacks", "s", cwd=d,
    )  # fmt: skip
    res["infer"] = stage(
        "infer", "--network", str(root / "net.pt"), "--particles", "p.star",
        "--workers", str(workers), "--out", "amplitudes.star", cwd=d,
    )  # fmt: skip
    res["space"] = stage(
        "space", "--particles", "p.star", "--modes", str(root / "modes.npz"),
        "--pdb", str(root / "model.pdb"), "--n-groups", "3", "--out-dir", "space", cwd=d,
    )  # fmt: skip
    g0 = count_star_rows(d / "space/group_0.star")
    res["reconstruct"] = stage(
        "reconstruct", "--particles", "space/group_0.star", "--out-half1", "h1.mrc",
        "--out-half2", "h2.mrc", "--out-map", "map.mrc", cwd=d,
    )  # fmt: skip
    res["reconstruct"]["note"] = f"group 0: {g0} of {n} images"
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--workers", type=int, default=2, help="infer's DataLoader workers")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exe = [sys.executable, "-m", "deephemnma"]
        pdb = str(REPO / "resources/adk_open.pdb")
        subprocess.run(
            [*exe, "prepare-model", "--structure", pdb, "--out-npz", f"{root}/model.npz",
             "--out-pdb", f"{root}/model.pdb"], check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [*exe, "nma", "--model", f"{root}/model.npz", "--pdb", f"{root}/model.pdb",
             "--out-npz", f"{root}/modes.npz", "--out-nmd", f"{root}/m.nmd",
             "--out-table", f"{root}/m.csv", "--out-anim-dir", f"{root}/anim"],
            check=True, capture_output=True,
        )  # fmt: skip
        import numpy as np

        numbers = [int(k) for k in np.load(root / "modes.npz")["mode_numbers"]]
        untrained_network(root / "net.pt", numbers, 2.2)
        results = {}
        for n in sizes:
            t = time.perf_counter()
            results[n] = run_size(root, n, a.workers)
            print(f"{n} images: {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for st in results[sizes[0]]:
        row = {"stage": st}
        for n in sizes:
            r = results[n][st]
            row[f"RssAnon MB @{n}"] = r["RssAnon"] / 1024
            row[f"VmHWM MB @{n}"] = r["VmHWM"] / 1024
            row[f"children MB @{n}"] = r["children"] / 1024
            row[f"s @{n}"] = r["wall"]
        if len(sizes) > 1:
            row["RssAnon ratio"] = (
                results[sizes[-1]][st]["RssAnon"] / results[sizes[0]][st]["RssAnon"]
            )
            row["VmHWM ratio"] = results[sizes[-1]][st]["VmHWM"] / results[sizes[0]][st]["VmHWM"]
        rows.append(row)
    print(f"64 px, ADK (1656 atoms), {torch.get_num_threads()} torch threads; MB = MiB")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print("reconstructed:", {n: results[n]["reconstruct"]["note"] for n in sizes})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
