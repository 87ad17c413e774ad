"""Inference throughput: images per second of a ResNet over memory-mapped 128² stacks.

Usage: python bench/infer.py [--arch resnet34] [--n-images 2048] [--box 128] [--batch B]
       [--net-box 128]   (B: the pipeline's default, 64 on a CPU and 256 on a GPU)
On a CPU: fp32, channels_last and bf16 autocast (where the CPU supports it) are compared;
on CUDA the pipeline's own path (bf16 weights + channels_last) is timed end to end.
"""

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from deephemnma import infer
from deephemnma.io import ParticleSet, optics_table, write_star
from deephemnma.mrc import StackWriter
from deephemnma.nets import ResNet, preprocess


def make_stack(d: str, n: int, box: int) -> ParticleSet:
    import pandas as pd

    cwd = os.getcwd()
    os.chdir(d)
    w = StackWriter("s", n, box, 1.1, 10000)
    rng = np.random.default_rng(0)
    for s in range(0, n, 512):
        w.write(rng.standard_normal((min(512, n - s), box, box), dtype=np.float32))
    parts = pd.DataFrame(
        {"rlnImageName": w.names, "rlnOpticsGroup": 1, "rlnDefocusU": 5000.0, "rlnDefocusV": 5000.0}
    )
    write_star("p.star", optics_table(1.1, box, 200, 2, 0.1), parts)
    ps = ParticleSet("p.star")
    os.chdir(cwd)
    return ps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--n-images", type=int, default=2048)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="default: infer.default_batch")
    p.add_argument(
        "--net-box",
        type=int,
        default=None,
        help="network's working box (Fourier crop; default: box)",
    )
    a = p.parse_args()
    net_box = a.net_box or a.box
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.batch = a.batch or infer.default_batch(dev)
    net = ResNet(a.arch, 3).eval()
    meta = {"param": "amplitudes", "mean": torch.zeros(3), "std": torch.ones(3), "box": net_box}
    with tempfile.TemporaryDirectory() as d:
        ps = make_stack(d, a.n_images, a.box)
        cwd = os.getcwd()
        os.chdir(d)
        where = (
            torch.cuda.get_device_name()
            if dev.type == "cuda"
            else (f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
        )
        print(
            f"inference {a.arch} at {net_box}², {a.n_images} images {a.box}² from memory-mapped"
            f" stacks; {where}"
        )
        ready = infer.ready_for_inference(net, dev)
        infer.predict(ready, meta, ps, dev, a.batch, 2)
        t = time.perf_counter()
        infer.predict(ready, meta, ps, dev, a.batch, 8 if dev.type == "cuda" else 2)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bf16 = "bf16 weights" if infer.bf16_supported(dev) else "fp32"
        rate = a.n_images / (time.perf_counter() - t)
        print(
            f"  pipeline (infer.predict, {bf16}, batch norms folded, channels_last, DataLoader):"
            f" {rate:.0f} img/s"
        )
        if dev.type == "cpu":
            variants = {  # the network as built, batch norms not folded
                "fp32, not folded": (False, False),
                "fp32 channels_last, not folded": (True, False),
                "bf16 autocast channels_last, not folded": (True, True),
            }
            for label, (cl, bf16) in variants.items():
                model = net.to(memory_format=torch.channels_last) if cl else net
                t = time.perf_counter()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    for s in range(0, a.n_images, a.batch):
                        x = preprocess(torch.from_numpy(ps.images[slice(s, s + a.batch)]), net_box)
                        if cl:
                            x = x.contiguous(memory_format=torch.channels_last)
                        model(x)
                print(f"  {label}: {a.n_images / (time.perf_counter() - t):.0f} img/s")
        os.chdir(cwd)


if __name__ == "__main__":
    main()
