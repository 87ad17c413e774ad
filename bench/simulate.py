"""Simulation throughput: images per second at 128² (2× oversampled) and peak memory.

Usage: python bench/simulate.py [--n-images 2000] [--box 128]
"""

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--box", type=int, default=128)
    a = p.parse_args()
    px = 1.1 * 128 / a.box
    with tempfile.TemporaryDirectory() as d:
        exe = [sys.executable, "-m", "deephemnma"]
        subprocess.run(
            [
                *exe,
                "prepare-model",
                "--structure",
                str(REPO / "resources/adk_open.pdb"),
                "--out-npz",
                f"{d}/model.npz",
                "--out-pdb",
                f"{d}/model.pdb",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *exe,
                "nma",
                "--model",
                f"{d}/model.npz",
                "--pdb",
                f"{d}/model.pdb",
                "--out-npz",
                f"{d}/modes.npz",
                "--out-nmd",
                f"{d}/m.nmd",
                "--out-table",
                f"{d}/m.csv",
                "--out-anim-dir",
                f"{d}/anim",
            ],
            check=True,
            capture_output=True,
        )
        t = time.perf_counter()
        subprocess.run(
            [
                *exe,
                "simulate",
                "--model",
                f"{d}/model.npz",
                "--modes",
                f"{d}/modes.npz",
                "--n-images",
                str(a.n_images),
                "--box",
                str(a.box),
                "--pixel-size",
                str(px),
                "--snr",
                "0.1",
                "--out-star",
                f"{d}/p.star",
                "--out-stacks",
                f"{d}/s",
            ],
            check=True,
            capture_output=True,
            cwd=d,
        )
        dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"simulate {a.n_images} images at {a.box}² (2x oversampled, 1656 atoms, CTF, SNR 0.1)")
    print(f"  {a.n_images / dt:.0f} images/s (wall, incl. start-up), peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
