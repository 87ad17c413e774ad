"""Where HEMNMA's time goes per image on the CPU: a torch.profiler breakdown by stage.

Usage: python bench/profile_hemnma.py [--boxes 64,128] [--n-images 16] [--batch 8]

Simulates open-AK particles as bench/hemnma.py does (modes 7-9, CTF, SNR 0.1), aligns them once
without the profiler after a one-batch warm-up (the seconds per image per core) and once under
torch.profiler, with the stages marked by wrapping, in this process only, the functions hemnma
calls: the global search, the targets (Fourier crop, CTF), the projector, the FFT of the
projections, the correlation, the rotation (matrix exponential), backward, and the Adam step.
Each stage's time is inclusive of what it calls (the targets' FFTs are counted under "FFT
forward" as well); "FFTs in all" adds the forward and backward FFT kernels, and "outside aten
kernels" is the profiled wall time less the aten kernels' own time (Python, autograd
bookkeeping, dispatch; inflated by the profiler).
"""

import argparse
import functools
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from deephemnma import hemnma, imaging
from deephemnma.cli import main as cli
from deephemnma.flexible import FlexibleModel
from deephemnma.io import ParticleSet

REPO = Path(__file__).resolve().parents[1]


def marked(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


STAGES = {
    "global search": (hemnma, "global_search"),
    "targets (crop, CTF)": (hemnma, "make_target"),
    "projection forward": (imaging, "project"),
    "FFT forward": (torch.fft, "rfft2"),
    "correlation forward": (hemnma, "ncc"),
    "rotation (matrix_exp)": (torch.linalg, "matrix_exp"),
    "backward": (torch.autograd, "backward"),
    "Adam step": (torch.optim.Adam, "step"),
}


def simulate(d: Path, box: int, n: int) -> None:
    px = 1.1 * 128 / box

    def run(*args):
        if cli([str(x) for x in args]) != 0:
            raise SystemExit(f"deephemnma {args[0]} failed")

    run("prepare-model", "--structure", REPO / "resources/adk_open.pdb",
        "--out-npz", d / "model.npz", "--out-pdb", d / "model.pdb")  # fmt: skip
    run("nma", "--model", d / "model.npz", "--pdb", d / "model.pdb", "--out-npz", d / "modes.npz",
        "--out-nmd", d / "m.nmd", "--out-table", d / "m.csv", "--out-anim-dir", d / "anim")  # fmt: skip
    run("simulate", "--model", d / "model.npz", "--modes", d / "modes.npz", "--n-images", n,
        "--box", box, "--pixel-size", px, "--max-shift-px", 5 * box / 128, "--seed", 7,
        "--snr", 0.1, "--out-star", d / "p.star", "--out-stacks", d / "s")  # fmt: skip


def profile_box(box: int, n: int, batch: int) -> None:
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        simulate(d, box, n)
        ps = ParticleSet(d / "p.star")
        model = FlexibleModel.load(d / "model.npz", d / "modes.npz")
        settings = hemnma.AlignSettings(batch=batch, max_shift_px=6.0 * box / 128)
        t = time.perf_counter()
        al = hemnma.Aligner(model, ps.box, ps.pixel_size, settings, torch.device("cpu"))
        gallery = time.perf_counter() - t
        rows = np.arange(n)
        hemnma.align_rows(ps, rows[:batch], al)  # warm-up (first calls, allocator)
        t = time.perf_counter()
        hemnma.align_rows(ps, rows, al)
        plain = time.perf_counter() - t
        saved = {k: getattr(mod, name) for k, (mod, name) in STAGES.items()}
        for k, (mod, name) in STAGES.items():
            setattr(mod, name, marked(k, saved[k]))
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                hemnma.align_rows(ps, rows, al)
                wall = time.perf_counter() - t
        finally:
            for k, (mod, name) in STAGES.items():
                setattr(mod, name, saved[k])
    ev = prof.key_averages()
    incl = {e.key: e.cpu_time_total / 1e6 for e in ev}
    kernels = [e for e in ev if e.key.startswith("aten::")]
    fft = sum(e.self_cpu_time_total for e in kernels if "fft" in e.key) / 1e6
    kernel_time = sum(e.self_cpu_time_total for e in kernels) / 1e6
    print(f"\nHEMNMA at {box} px, {n} images (CTF, SNR 0.1), batch {batch}; "
          f"{platform.machine()} CPU, {threads} threads")  # fmt: skip
    print(f"  without profiler: {plain * threads / n:.3f} s per image per core "
          f"({plain / n:.3f} s wall per image; gallery {gallery:.1f} s once)")  # fmt: skip
    print(f"  under profiler: {wall / n:.3f} s wall per image; share of profiled wall:")
    for k in STAGES:
        print(
            f"    {k:24s} {incl.get(k, 0.0) / n * 1e3:8.1f} ms/image  {incl.get(k, 0) / wall:6.1%}"
        )
    for k, v in (("FFTs in all", fft), ("outside aten kernels", wall - kernel_time)):
        print(f"    {k:24s} {v / n * 1e3:8.1f} ms/image  {v / wall:6.1%}")
    print("  top kernels by own time:")
    for e in sorted(kernels, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"    {e.key:40s} {e.self_cpu_time_total / 1e6 / wall:6.1%}  ({e.count} calls)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--boxes", default="64,128")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    for box in map(int, a.boxes.split(",")):
        profile_box(box, a.n_images, a.batch)


if __name__ == "__main__":
    main()
