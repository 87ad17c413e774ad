"""GPU checks and benchmarks (run once on a lent H100/H200; also runs small on a CPU).

Needs model.npz / modes.npz of open AK (prepare-model + nma, made on any machine). Steps, each timed
and printed as it finishes:
  1. the projector gives the same images on CPU and GPU;
  2. simulate the reference set (docs/protocol.md: 20,000 images at 128², SNR 0.1, CTF) on the GPU;
  3. HEMNMA on a subset: images/s and accuracy against ground truth;
  4. split 14,055 train / rest val / 2,000 test; render synthetic pretraining images; train
     ResNet-34 (working box 64, angles over the SO(3) grid) on the truth for amplitudes, angles
     and shifts — pretraining, then fine-tuning — and evaluate on the test images next to the
     baselines (amplitudes with views at the angle and shift networks' poses, unless
     --no-views);
  5. inference throughput (ResNet-34, bf16) end to end from the memory-mapped stacks;
  6. the same networks trained on HEMNMA's labels of part of the training/validation images;
  7. hybrid: on --hybrid-images test images, local refinement from each network set's answers
     (the angle network's --candidates orientations, the --escalate fraction with the highest
     cost aligned again by the global search) next to full HEMNMA on the same images: accuracy
     against the truth and images/s.

Usage: python bench/gpu_checks.py --inputs DIR --work DIR [--n-images 20000] [--box 128] ...
"""

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deephemnma import geometry, hemnma, imaging, infer, quality, simulate, split, synthesize, train
from deephemnma.cli import build_parser
from deephemnma.flexible import FlexibleModel, load_model
from deephemnma.io import ParticleSet, write_star

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def cli_args(verb: str, argv: list[str]) -> argparse.Namespace:
    return build_parser(verb).parse_args([verb, *argv])


def inference_benchmark(
    work: Path, ps: ParticleSet, dev: torch.device, a, summary: dict, poses
) -> None:
    """5. inference throughput (bf16 on CUDA) end to end from the memory-mapped stacks."""
    net, meta = infer.load_network(str(work / "amplitudes" / "network.pt"), dev)
    infer.predict(net, meta, ps, dev, 1024, a.workers, poses)  # warm-up
    t = time.perf_counter()
    for _ in range(a.infer_repeats):
        infer.predict(net, meta, ps, dev, 1024, a.workers, poses)
    dt = time.perf_counter() - t
    rate = a.infer_repeats * len(ps) / dt
    summary["inference_images_per_s"] = rate
    say(f"inference ({a.arch}): {rate:.0f} img/s over {a.infer_repeats} x {len(ps)} images")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", required=True, help="folder with model.npz and modes.npz")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="folder for figures, tables and the summary")
    p.add_argument("--n-images", type=int, default=20000)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--n-train", type=int, default=14055)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--hemnma-images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs on the labels")
    p.add_argument("--net-box", type=int, default=64, help="networks' working box")
    p.add_argument("--pretrain-images", type=int, default=50000, help="0: no pretraining")
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--arch", default="resnet34")
    p.add_argument(
        "--hemnma-labels", type=int, default=4000, help="train/val images HEMNMA labels (0: skip)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--infer-repeats", type=int, default=5)
    p.add_argument("--hybrid-images", type=int, default=512, help="test images (0: skip)")
    p.add_argument("--candidates", type=int, default=8, help="hybrid: orientation candidates")
    p.add_argument("--escalate", type=float, default=0.25, help="hybrid: share re-searched")
    p.add_argument(
        "--views",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="amplitude networks also see the reference's views",
    )
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    say(f"device: {name}; torch {torch.__version__}")
    work, out, inp = Path(a.work), Path(a.out), Path(a.inputs)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": name}
    m = load_model(inp / "model.npz")

    # 1. projector CPU == GPU
    rng = np.random.default_rng(0)
    rot = geometry.euler_to_matrix(torch.tensor(geometry.random_euler(8, rng), dtype=torch.float32))
    cpu_args = (
        torch.tensor(m["coords"], dtype=torch.float32),
        rot,
        torch.zeros(8, 2),
        torch.tensor(m["weights"], dtype=torch.float32),
        128,
        1.1,
        1.0,
    )
    ref = imaging.project(*cpu_args)
    got = imaging.project(*(x.to(dev) if torch.is_tensor(x) else x for x in cpu_args)).cpu()
    err = float((got - ref).abs().max() / ref.abs().max())
    summary["projector_max_rel_diff_cpu_gpu"] = err
    say(f"projector CPU vs {dev.type}: max relative difference {err:.2e}")

    # 2. simulate the reference set
    px = 1.1 * 128 / a.box
    star = work / "particles.star"
    sim = cli_args(
        "simulate",
        [
            "--model",
            str(inp / "model.npz"),
            "--modes",
            str(inp / "modes.npz"),
            "--n-images",
            str(a.n_images),
            "--box",
            str(a.box),
            "--pixel-size",
            str(px),
            "--snr",
            "0.1",
            "--max-shift-px",
            str(5 * a.box / 128),
            "--batch",
            "256",
            "--out-star",
            str(star),
            "--out-stacks",
            str(work / "stacks"),
            "--out-montage",
            str(out / "montage.png"),
        ],
    )
    t = time.perf_counter()
    simulate.main(sim)
    dt = time.perf_counter() - t
    summary["simulate_images_per_s"] = a.n_images / dt
    say(f"simulated {a.n_images} images at {a.box}² in {dt:.1f} s: {a.n_images / dt:.0f} img/s")
    ps = ParticleSet(star)

    # 3. HEMNMA on a subset
    n_h = min(a.hemnma_images, len(ps))
    settings = hemnma.AlignSettings(
        batch=128 if dev.type == "cuda" else 8, max_shift_px=6.0 * a.box / 128
    )
    al = hemnma.Aligner(
        FlexibleModel.load(inp / "model.npz", inp / "modes.npz"),
        ps.box,
        ps.pixel_size,
        settings,
        dev,
    )
    hemnma.align_rows(ps, np.arange(min(n_h, settings.batch)), al)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = hemnma.align_rows(ps, np.arange(n_h), al)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    ang = geometry.euler_distance_deg(res["euler"], ps.euler(np.arange(n_h)))
    amp = np.abs(res["amplitudes"] - ps.amplitudes([7, 8, 9], np.arange(n_h)))
    summary["hemnma"] = {
        "images": n_h,
        "images_per_s": n_h / dt,
        "angle_mean": ang.mean(),
        "angle_std": ang.std(),
        "amp_mean_per_mode": amp.mean(0).tolist(),
        "amp_std_per_mode": amp.std(0).tolist(),
    }
    say(
        f"HEMNMA: {n_h / dt:.1f} img/s; angle {ang.mean():.2f} ± {ang.std():.2f} deg; "
        f"|amp err| {np.round(amp.mean(0), 1)}"
    )

    # 4. split and train on the truth
    n = len(ps)
    n_val = n - a.n_train - a.n_test
    sets = split.split_sets(n, n_val, a.n_test, 0)
    pd.DataFrame({"rlnImageName": ps.particles["rlnImageName"], "set": sets}).to_csv(
        work / "split.csv", index=False
    )
    test_rows = np.nonzero(sets == "test")[0]
    syn_dir = work / "synthetic"
    if a.pretrain_images:
        t = time.perf_counter()
        synthesize.main(
            cli_args(
                "synthesize",
                [
                    "--model",
                    str(inp / "model.npz"),
                    "--modes",
                    str(inp / "modes.npz"),
                    "--particles",
                    str(star),
                    "--labels",
                    str(star),
                    "--n-images",
                    str(a.pretrain_images),
                    "--box",
                    str(a.net_box),
                    "--batch",
                    "512",
                    "--out-dir",
                    str(syn_dir),
                    "--out-figure",
                    str(out / "synthetic.png"),
                ],
            )  # fmt: skip
        )
        dt = time.perf_counter() - t
        summary["synthesize_images_per_s"] = a.pretrain_images / dt
        say(f"synthesized {a.pretrain_images} pretraining images at {a.net_box}² in {dt:.1f} s")
    truth = {
        "euler": ps.euler(test_rows),
        "shifts": ps.shifts_px(test_rows),
        "amplitudes": ps.amplitudes([7, 8, 9], test_rows),
    }
    train_rows = np.nonzero(sets == "train")[0]
    base = quality.baseline(
        {
            "euler": ps.euler(train_rows),
            "shifts": ps.shifts_px(train_rows),
            "amplitudes": ps.amplitudes([7, 8, 9], train_rows),
        },
        len(test_rows),
    )

    hybrid_rows = test_rows[: a.hybrid_images]
    model = FlexibleModel.load(inp / "model.npz", inp / "modes.npz")

    def timed_align(start: hemnma.Start | None) -> tuple[dict, float]:
        """Align the hybrid rows (global search, or local from `start` then escalation)."""
        s = replace(settings, start="search" if start is None else "network")
        aligner = hemnma.Aligner(model, ps.box, ps.pixel_size, s, dev)
        t = time.perf_counter()
        res = hemnma.align_rows(ps, hybrid_rows, aligner, start=start)
        if start is not None and a.escalate > 0:
            res = hemnma.escalate(ps, hybrid_rows, [model], s, dev, res, a.escalate)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return res, time.perf_counter() - t

    def accuracy(res: dict) -> dict:
        ang = geometry.euler_distance_deg(res["euler"], ps.euler(hybrid_rows))
        amp = np.abs(res["amplitudes"] - ps.amplitudes([7, 8, 9], hybrid_rows)).mean()
        shift = np.linalg.norm(res["shifts_px"] - ps.shifts_px(hybrid_rows), axis=1).mean()
        values = {"angle_mean": ang.mean(), "angle_median": np.median(ang), "amp_mean": amp,
                  "shift_mean": shift, "beyond_5deg": (ang > 5).mean()}  # fmt: skip
        return {k: round(float(v), 4) for k, v in values.items()}

    def hybrid_figure(tag: str, answers: dict) -> None:
        """7. the hybrid from the networks' answers against HEMNMA on the same test images."""
        if not len(hybrid_rows):
            return
        n = len(ps)
        start = hemnma.Start(
            answers["angles"][:, :3], answers["shifts"][:, :2], answers["amplitudes"][:, :3],
            answers["angles"][:, 4:].reshape(n, -1, 3) if a.candidates > 1 else None,
        )  # fmt: skip
        if "hemnma_same_images" not in summary:
            res, dt = timed_align(None)
            summary["hemnma_same_images"] = {**accuracy(res), "images_per_s": len(res["cost"]) / dt}
            say(
                f"HEMNMA on the {len(hybrid_rows)} hybrid test images: {summary['hemnma_same_images']}"
            )
        res, dt = timed_align(start)
        summary[tag]["hybrid"] = {**accuracy(res), "images_per_s": len(res["cost"]) / dt}
        say(f"[{tag}] hybrid on {len(hybrid_rows)} test images: {summary[tag]['hybrid']}")

    def train_and_test(labels: Path, split_csv: Path, tag: str) -> None:
        """Train the three networks on `labels`, judge them on the test images against truth."""
        summary[tag] = {}
        poses = {}  # the angle and shift networks' answers for every image
        answers = {}  # every network's predictions for every image
        for param in ("angles", "shifts", "amplitudes"):
            folder = work / tag / param
            argv = ["--param", param, "--labels", str(labels), "--split", str(split_csv)]
            argv += ["--arch", a.arch, "--epochs", str(a.epochs), "--box", str(a.net_box)]
            argv += ["--batch-size", str(a.batch_size), "--workers", str(a.workers)]
            argv += ["--lr", "2e-3", "--patience", "10", "--out-dir", str(folder)]
            if a.pretrain_images:
                argv += ["--pretrain", str(syn_dir), "--pretrain-epochs", str(a.pretrain_epochs)]
            views = param == "amplitudes" and a.views
            if views:
                argv += ["--views", "--model", str(inp / "model.npz")]
                argv += ["--modes", str(inp / "modes.npz")]
            t = time.perf_counter()
            train.main(cli_args("train", argv))
            dt = time.perf_counter() - t
            hist = pd.read_csv(folder / "history.csv")
            net, meta = infer.load_network(str(folder / "network.pt"), dev)
            given = (poses["angles"], poses["shifts"]) if views else None
            k = a.candidates if param == "angles" and meta["angle_repr"] == "so3grid" else 1
            pred = infer.predict(net, meta, ps, dev, 512, a.workers, given, candidates=k)
            answers[param] = pred
            if param != "amplitudes":
                poses[param] = pred[:, :3] if param == "angles" else pred[:, :2]
            pred = pred[test_rows]
            names = ps.particles["rlnImageName"].iloc[test_rows]
            table = infer.prediction_table(meta, names, pred, px)
            est = {**truth, **quality.labels_of(table, px, [7, 8, 9])}
            err = quality.errors(param, est, truth)
            metric = {
                "mean": float(err.mean()),
                "std": float(err.std()),
                "baseline": float(quality.errors(param, base, truth).mean()),
            }
            if param == "amplitudes":
                e = np.abs(est["amplitudes"] - truth["amplitudes"])
                metric["mean_per_mode"] = e.mean(0).tolist()
            summary[tag][param] = {
                "epochs": int(hist["epoch"].max()),
                "seconds": dt,
                "seconds_per_epoch": float(hist["seconds"].mean()),
                "test": metric,
            }
            shutil.copy(folder / "loss.png", out / f"loss_{tag}_{param}.png")
            say(
                f"[{tag}] trained {param}: {len(hist)} epochs in {dt:.0f} s; test vs truth {metric}"
            )
            (out / "summary.json").write_text(
                json.dumps(summary, indent=1, default=float), encoding="utf-8"
            )
            if param == "amplitudes" and tag == "train_truth":
                inference_benchmark(work / tag, ps, dev, a, summary, given)
        hybrid_figure(tag, answers)

    train_and_test(star, work / "split.csv", "train_truth")

    # 6. the same on HEMNMA labels: HEMNMA on part of the training/validation images
    if a.hemnma_labels:
        labelled = np.sort(np.r_[np.nonzero(sets != "test")[0][: a.hemnma_labels], test_rows])
        sub_star = work / "hemnma_subset.star"
        write_star(sub_star, ps.optics, ps.particles.iloc[labelled])
        sub = ParticleSet(sub_star)
        t = time.perf_counter()
        res = hemnma.align_rows(sub, np.arange(len(sub)), al)
        dt = time.perf_counter() - t
        say(f"HEMNMA labels for {len(sub)} images in {dt:.0f} s ({len(sub) / dt:.0f} img/s)")
        labels = work / "hemnma.star"
        write_star(labels, ps.optics, hemnma.result_table(sub, res, al.model.mode_numbers))
        split_h = work / "split_hemnma.csv"
        names = ps.particles["rlnImageName"].iloc[labelled]
        pd.DataFrame({"rlnImageName": names, "set": sets[labelled]}).to_csv(split_h, index=False)
        train_and_test(labels, split_h, "train_hemnma")

    (out / "summary.json").write_text(
        json.dumps(summary, indent=1, default=float), encoding="utf-8"
    )
    say("done")


if __name__ == "__main__":
    sys.exit(main())
