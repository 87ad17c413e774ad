"""Reconstruction time: direct Fourier inversion (with CTF, 2× padding, half-maps) of N images.

Usage: python bench/reconstruct.py [--n-images 10000] [--box 128]
The images are random (the cost does not depend on their content); poses are uniform on SO(3).
"""

import argparse
import os
import platform
import resource
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from deephemnma import geometry
from deephemnma.io import ParticleSet, StackWriter, optics_table, write_star
from deephemnma.reconstruct import reconstruct_halves


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=10000)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        cwd = os.getcwd()
        os.chdir(d)
        w = StackWriter("s", a.n_images, a.box, 1.1, 10000)
        for s in range(0, a.n_images, 500):
            w.write(rng.standard_normal((min(500, a.n_images - s), a.box, a.box), dtype=np.float32))
        eul = geometry.random_euler(a.n_images, rng)
        parts = pd.DataFrame(
            {
                "rlnImageName": w.names,
                "rlnOpticsGroup": 1,
                "rlnAngleRot": eul[:, 0],
                "rlnAngleTilt": eul[:, 1],
                "rlnAnglePsi": eul[:, 2],
                "rlnOriginXAngst": 0.0,
                "rlnOriginYAngst": 0.0,
                "rlnDefocusU": 5000.0,
                "rlnDefocusV": 5000.0,
                "rlnDefocusAngle": 0.0,
                "rlnPhaseShift": 0.0,
            }
        )
        write_star("p.star", optics_table(1.1, a.box, 200, 2, 0.1), parts)
        ps = ParticleSet("p.star")
        half = rng.permutation(a.n_images) % 2
        t = time.perf_counter()
        reconstruct_halves(ps, np.arange(a.n_images), half, 0.1, a.batch)
        dt = time.perf_counter() - t
        os.chdir(cwd)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"reconstruct {a.n_images} images at {a.box}² (CTF, 2x padding, two half-maps + map); "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"  {dt:.1f} s ({a.n_images / dt:.0f} images/s), peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
