"""HEMNMA on particles of a structure other than the reference: closed AK against open AK.

Simulates particles of closed adenylate kinase (1AKE, CA-superposed on 4AKE), or a mixture with
open AK (4AKE; 50/50 unless --closed-fraction), at 64 px, 2.2 Å/px, SNR 0.1, with CTF (5,000 Å
defocus, 200 kV), uniform SO(3), shifts ±2.5 px; optionally with Gaussian fluctuations along each
structure's own modes. Aligns them against the open model (or open + closed references) and
prints, per true state: pose error (mean/median, fraction within 5°), amplitude error against the
least-squares projection of each particle's true structure on the open model's modes (mean |error|
per mode and the median error norm relative to the open -> closed distance in amplitudes), the
chosen reference, the fraction flagged by the quality flag (gather.cost_z), and for a mixture the
open/closed AUC of PC1 of the amplitudes and of the cost, and what the workflow's space keeps
(the unflagged images): how many, the share of closed ones, the share with a pose within 5°.
Per state also the frame offset (the mean rotation between true and found orientations: a
reference in a rotated frame answers every pose rotated by it), the pose errors with it removed,
and the tail of the pose errors (90th percentile, share beyond 20°). --from-truth also refines every image
from its true pose and least-squares amplitudes: if that objective beats the search's, the search
missed the right basin; if not, the model fits a wrong pose better (its reach is the limit).
Default sizes (200 images, 3 modes, one reference) take about 1.5 min on 2 cores.
--reference-update N then runs N reference updates (as the workflow's `fit` rules): the group of
images (`--update-groups flagged`: flagged, or on a fitted reference; `kmeans`: k-means groups of
the amplitudes) is reconstructed with its poses, the open model fitted into that map, and all
images aligned again against the open and the fitted references; each pass prints the same table,
and each fitted reference's RMSD to the closed and to the open structure.

Usage: python bench/conformations.py [--particles closed|mixture] [--n-images 200] [--modes 3]
       [--references open|both] [--amplitude-prior 0] [--spread 0] [--from-truth]
       [--candidates 4] [--retry 0.05] [--retry-candidates 16] [--gallery-amplitude 100]
       [--reference-update 0]
       [--update-groups flagged|kmeans] [--update-n-groups 2]
"""

import argparse
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from deephemnma import fit, geometry, hemnma, simulate
from deephemnma import model as model_mod
from deephemnma import nma as nma_mod
from deephemnma.flexible import FlexibleModel
from deephemnma.gather import cost_z
from deephemnma.io import amplitude_column

REPO = Path(__file__).resolve().parents[1]


def reference(pdb: Path, n_modes: int) -> FlexibleModel:
    """Heavy atoms of `pdb`, centred, with ANM modes 7..6+n_modes in HEMNMA units."""
    ag = model_mod.prepare_model(pdb, "heavy", None)
    _, evals, modes = nma_mod.compute_modes(ag, n_modes, 15.0, 1.0, 5000)
    weights = model_mod.scattering_weights(ag.getElements())
    numbers = np.arange(7, 7 + n_modes)
    return FlexibleModel(ag.getCoords(), modes, weights, numbers, evals, model_mod.atom_labels(ag))


def lsq_amplitudes(structures: np.ndarray, ref: FlexibleModel) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares amplitudes (B, K) of structures (B, N, 3) on `ref`'s modes and the RMSD left."""
    basis = ref.modes.reshape(len(ref.modes), -1).T
    rhs = (structures - ref.coords[None]).reshape(len(structures), -1).T
    q = np.linalg.lstsq(basis, rhs, rcond=None)[0].T
    left = structures - ref.deform(q)
    return q, np.sqrt((left**2).sum(-1).mean(-1))


def refine_from_truth(
    al: hemnma.Aligner,
    images: np.ndarray,
    ctf: dict,
    euler: np.ndarray,
    shifts_px: np.ndarray,
    amps: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-box refinement of every image started at its true pose and least-squares amplitudes:
    (objective (B,), refined Euler angles (B, 3))."""
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)
    objective, found = [], []
    for start in range(0, len(images), 32):
        r = np.arange(start, min(start + 32, len(images)))
        target = hemnma.make_target(t(images[r]), ctf, r, al.box, al.px, True)
        out = hemnma.refine(
            target,
            al.model,
            geometry.euler_to_matrix(t(euler[r])),
            t(shifts_px[r]),
            t(amps[r]),
            al.s.iterations[1],
            al.s,
            al.box,
            al.prior_sd,
        )
        objective.append(out[4].numpy())
        found.append(geometry.matrix_to_euler(out[0].double()).numpy())
    return np.concatenate(objective), np.concatenate(found)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--particles", choices=["closed", "mixture"], default="closed")
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--modes", type=int, default=3)
    p.add_argument("--references", choices=["open", "both"], default="open")
    p.add_argument("--amplitude-prior", type=float, default=0.0)
    d = hemnma.AlignSettings()
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--retry", type=float, default=d.retry, help="share searched again")
    p.add_argument("--retry-candidates", type=int, default=d.retry_candidates)
    p.add_argument("--gallery-amplitude", type=float, default=d.gallery_amplitude)
    p.add_argument("--coarse-cell", type=float, default=d.coarse_cell, help="0: coarse on atoms")
    p.add_argument("--closed-fraction", type=float, default=0.5, help="of a mixture")
    p.add_argument("--spread", type=float, default=0.0, help="std of amplitudes along own modes")
    p.add_argument("--flag-z", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument(
        "--from-truth",
        action="store_true",
        help="also refine from each true pose and least-squares amplitudes (search or model?)",
    )
    p.add_argument("--reference-update", type=int, default=0, help="reference updates (passes)")
    p.add_argument("--update-groups", choices=fit.GROUPINGS, default="flagged")
    p.add_argument("--update-n-groups", type=int, default=2, help="kmeans groups")
    p.add_argument("--update-box", type=int, default=fit.FitSettings.box, help="fit box")
    p.add_argument("--restrain-steps", type=int, default=fit.FitSettings.restrain_steps)
    p.add_argument("--restrain-weight", type=float, default=fit.FitSettings.restrain_weight)
    p.add_argument("--restrain-within", type=float, default=fit.FitSettings.restrain_within)
    p.add_argument("--fit-sigma", type=float, default=fit.FitSettings.sigma_angstrom)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    open_ref = reference(REPO / "resources/adk_open.pdb", a.modes)
    closed_ref = hemnma.superpose(reference(REPO / "resources/adk_closed.pdb", a.modes), open_ref)
    assert (open_ref.atom_ids == closed_ref.atom_ids).all()

    # ground truth: closed (1) or a mixture; amplitudes along each structure's own modes
    cfg = simulate.SimulationSettings(snr=0.1, seed=a.seed)
    numbers = np.arange(7, 7 + a.modes)
    params = simulate.draw_parameters(a.n_images, numbers, cfg)
    rng = np.random.default_rng(a.seed + 10)
    own = rng.normal(0.0, a.spread, size=(a.n_images, a.modes))
    for j, k in enumerate(numbers):
        params[amplitude_column(int(k))] = own[:, j]
    state = np.ones(a.n_images, dtype=int)
    if a.particles == "mixture":
        n_open = a.n_images - round(a.closed_fraction * a.n_images)
        state[rng.permutation(a.n_images)[:n_open]] = 0
    refs = [open_ref, closed_ref]
    gen = torch.Generator().manual_seed(a.seed + 1)
    images = np.zeros((a.n_images, cfg.box, cfg.box), dtype=np.float32)
    truth_xyz = np.zeros((a.n_images, len(open_ref.coords), 3))
    for s, ref in enumerate(refs):
        rows = np.flatnonzero(state == s)
        for start in range(0, len(rows), 32):
            r = rows[start : start + 32]
            out = simulate.render(ref.to(), params.iloc[r], cfg, gen)
            images[r] = out["final"].numpy()
        truth_xyz[rows] = ref.deform(own[rows])
    truth_amp, rmsd_left = lsq_amplitudes(truth_xyz, open_ref)

    # alignment
    ctf = {
        "defocus_u": params["rlnDefocusU"].to_numpy(),
        "defocus_v": params["rlnDefocusV"].to_numpy(),
        "defocus_angle": params["rlnDefocusAngle"].to_numpy(),
        "phase_shift": params["rlnPhaseShift"].to_numpy(),
        "voltage_kv": np.full(a.n_images, cfg.voltage_kv),
        "cs_mm": np.full(a.n_images, cfg.cs_mm),
        "amplitude_contrast": np.full(a.n_images, cfg.amplitude_contrast),
        "bfactor": params["rlnCtfBfactor"].to_numpy(),
    }
    settings = hemnma.AlignSettings(
        amplitude_prior=a.amplitude_prior,
        candidates=a.candidates,
        retry=a.retry,
        retry_candidates=a.retry_candidates,
        gallery_amplitude=a.gallery_amplitude,
        coarse_cell=a.coarse_cell,
    )
    used = refs if a.references == "both" else refs[:1]
    true_euler = params[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    threads = torch.get_num_threads()
    print(
        f"HEMNMA on {a.n_images} {a.particles} AK particles, 64 px, 2.2 Å/px, CTF + SNR 0.1, "
        f"spread {a.spread:g}; references: {a.references}; {a.modes} modes; "
        f"amplitude prior {a.amplitude_prior:g}; {a.candidates} candidates (the {a.retry:.0%} "
        f"highest-cost images: {a.retry_candidates}), gallery "
        f"±{a.gallery_amplitude:g}, coarse cell {a.coarse_cell:g}; {platform.machine()} CPU, "
        f"{threads} thread(s)"
    )
    print(
        "  truth: LSQ amplitudes of closed on the open modes "
        f"{np.round(truth_amp[state == 1].mean(0), 1)}, RMSD left {rmsd_left[state == 1].mean():.2f} Å"
    )
    n_given = len(used)
    for update in range(a.reference_update + 1):
        res, amps, flagged = align_and_report(
            a,
            used,
            n_given,
            images,
            ctf,
            cfg,
            settings,
            state,
            true_euler,
            truth_amp,
            closed_ref,
            open_ref,
            params,
            update,
        )
        if update == a.reference_update:
            break
        # reference update: the group's map from this pass's poses, the open model fitted into it
        table = pd.DataFrame(
            {"dhFlagged": flagged.astype(int), "dhReference": res["reference"] + 1}
        )
        for j, k in enumerate(numbers):
            table[amplitude_column(int(k))] = amps[:, j]
        ps = SimpleNamespace(
            images=images,
            ctf_params=lambda: ctf,
            euler=lambda res=res: res["euler"],
            shifts_px=lambda res=res: res["shifts_px"],
            box=cfg.box,
            pixel_size=cfg.pixel_size,
            has_ctf=True,
        )
        n_groups = 1 if a.update_groups == "flagged" else a.update_n_groups
        fitted = []
        for g in range(n_groups):
            rows = fit.group_rows(table, a.update_groups, g, n_groups, n_given, a.seed)
            t1 = time.perf_counter()
            if len(rows) < 10:  # as the fit verb's --min-images: the reference is kept
                ref, cc = open_ref, []
            else:
                volume = fit.group_map(ps, rows, a.seed)
                ref, cc = fit.fit_reference(
                    open_ref,
                    volume,
                    cfg.pixel_size,
                    fit.FitSettings(
                        box=a.update_box,
                        restrain_steps=a.restrain_steps,
                        restrain_weight=a.restrain_weight,
                        restrain_within=a.restrain_within,
                        sigma_angstrom=a.fit_sigma,
                    ),
                )
            ref = hemnma.superpose(ref, open_ref)
            closed_share = (state[rows] == 1).mean() if len(rows) else float("nan")
            print(
                f"  update {update + 1}, group {g}: {len(rows)} images ({closed_share:.0%} closed); "
                f"fitted RMSD to closed {rmsd_super(ref, closed_ref):.2f} Å (open model: "
                f"{rmsd_super(open_ref, closed_ref):.2f} Å), to open {rmsd_super(ref, open_ref):.2f} Å; "
                f"correlation per round {np.round(cc, 3).tolist()}; {time.perf_counter() - t1:.0f} s"
            )
            fitted.append(ref)
        used = refs[:n_given] + fitted


def rmsd_super(a: FlexibleModel, b: FlexibleModel) -> float:
    """RMSD (Å) of `a` to `b` after superposing `a` on `b` over their CA atoms."""
    moved = hemnma.superpose(a, b)
    return float(np.sqrt(((moved.coords - b.coords) ** 2).sum(-1).mean()))


def align_and_report(
    a,
    used,
    n_given,
    images,
    ctf,
    cfg,
    settings,
    state,
    true_euler,
    truth_amp,
    closed_ref,
    open_ref,
    params,
    update,
):
    """Align every image against the references `used`; print the pass's table."""
    cpu = torch.device("cpu")
    aligners = [hemnma.Aligner(r, cfg.box, cfg.pixel_size, settings, cpu) for r in used]
    t0 = time.perf_counter()
    ps = SimpleNamespace(images=images, ctf_params=lambda: ctf, has_ctf=True)
    res = hemnma.align_rows(ps, np.arange(a.n_images), aligners)  # as the workflow's shards
    wall = time.perf_counter() - t0
    amps = hemnma.common_amplitudes(used, res["reference"], res["amplitudes"])

    ang = geometry.euler_distance_deg(res["euler"], true_euler)
    err = np.abs(amps - truth_amp)
    # relative to the open -> closed distance in amplitude space
    scale = np.linalg.norm(lsq_amplitudes(closed_ref.coords[None], open_ref)[0])
    rel = np.linalg.norm(amps - truth_amp, axis=1) / scale
    costs = pd.DataFrame({"dhCost": res["cost"], "dhReference": res["reference"] + 1})
    flagged = cost_z(costs, originals=n_given) > a.flag_z  # as gather --originals
    threads = torch.get_num_threads()
    right = lambda m, s: f"{(res['reference'][m] == s).mean():.0%}" if len(used) > 1 else "-"
    if update:
        print(f"pass {update} (after reference update {update}): {len(used)} references")
        right = lambda m, s: f"{(res['reference'][m] >= n_given).mean():.0%} fitted"
    print(
        "| state | n | pose mean | median | ≤5° | mean abs amp err per mode | amp err / open-closed"
        " | right reference | flagged | median cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, name in enumerate(["open", "closed"]):
        m = state == s
        if not m.any():
            continue
        print(
            f"| {name} | {m.sum()} | {ang[m].mean():.2f}° | {np.median(ang[m]):.2f}° | "
            f"{(ang[m] <= 5).mean():.0%} | {np.round(err[m].mean(0), 1)} | "
            f"{np.median(rel[m]):.1%} | {right(m, s)} | {flagged[m].mean():.0%} | "
            f"{np.median(res['cost'][m]):.4f} |"
        )
    # a reference in a frame rotated by Q answers R_true Q^T: a constant offset on the right
    r_est = geometry.euler_to_matrix(res["euler"])
    r_true = geometry.euler_to_matrix(true_euler)
    for s, name in enumerate(["open", "closed"]):
        m = state == s
        if m.any():
            near = m & (ang < 20)  # gross failures would pull the mean anywhere
            if not near.any():
                continue
            offset = geometry.mean_rotation(np.swapaxes(r_true[near], 1, 2) @ r_est[near])
            rest = geometry.matrix_distance_deg(r_true[m] @ offset, r_est[m])
            print(
                f"  {name}: frame offset {geometry.matrix_distance_deg(offset, np.eye(3)):.2f}°; "
                f"without it median {np.median(rest):.2f}°, ≤5° {(rest <= 5).mean():.0%}; "
                f"pose error 90th percentile {np.percentile(ang[m], 90):.1f}°, "
                f"> 20° {(ang[m] > 20).mean():.0%}"
            )
    if a.from_truth and len(used) == 1:
        # does the right basin score better than what the search found? (no: model, yes: search)
        origin = params[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
        obj, eul = refine_from_truth(
            aligners[0], images, ctf, true_euler, -origin / cfg.pixel_size, truth_amp
        )
        drift = geometry.euler_distance_deg(eul, true_euler)
        for s, name in enumerate(["open", "closed"]):
            m = state == s
            if m.any():
                print(
                    f"  {name}, refined from the true pose and LSQ amplitudes: objective below the "
                    f"search's for {(obj[m] < res['objective'][m] - 1e-6).mean():.0%}, "
                    f"above for {(obj[m] > res['objective'][m] + 1e-6).mean():.0%}; "
                    f"pose error after it median {np.median(drift[m]):.2f}°, "
                    f"≤5° {(drift[m] <= 5).mean():.0%}"
                )
    if a.particles == "mixture":
        pc1 = PCA(1).fit_transform(amps)[:, 0]
        auc = roc_auc_score(state, pc1)
        cost_auc = roc_auc_score(state, res["cost"])
        print(
            f"  open/closed AUC of PC1 of the amplitudes: {max(auc, 1 - auc):.3f}; "
            f"AUC of the cost (closed above open): {cost_auc:.3f}"
        )
        kept = ~flagged  # the images the workflow's space is built from (analysis.untrusted)
        closed_kept = state[kept] == 1
        good = (ang[kept] <= 5).mean() if kept.any() else float("nan")
        print(
            f"  the space (unflagged images): {kept.sum()} of {a.n_images}, "
            f"{closed_kept.mean():.0%} closed (of the input: {(state == 1).mean():.0%}); "
            f"{good:.0%} of them with a pose within 5°"
        )
    per = wall / a.n_images
    print(f"  {per * threads:.2f} s per image per core ({len(used)} reference(s))")
    return res, amps, flagged


if __name__ == "__main__":
    main()
