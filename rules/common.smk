# Input functions and helpers (no rules).
from pathlib import Path

from snakemake.exceptions import WorkflowError

from deephemnma.config import check_sizes, cli_flags
from deephemnma.model import is_map


def check_config_files():
    """Fail at load time, naming the config key, when a configured input file is missing."""
    keys = [("structure", s) for s in structures()]
    keys.append(("nma.compare_to", config["nma"]["compare_to"]))
    for key, path in keys:
        if path is not None and not Path(path).is_file():
            raise WorkflowError(f"config key '{key}': file '{path}' does not exist")
    if any(is_map(s) for s in structures()[1:]):
        raise WorkflowError(
            "config key 'structure': only the first structure may be an EM map "
            "(further references need atoms shared with it)"
        )
    params = config["network"]["params"]
    if config["network"]["views"] and "amplitudes" in params:
        if not {"angles", "shifts"} <= set(params):
            raise WorkflowError(
                "config key 'network.views': the amplitude network is shown views at the "
                "angle and shift networks' poses; add angles and shifts to network.params "
                "or set network.views: false"
            )
    if (
        is_map(structures()[0])
        and config["hemnma"]["reference_update"]["iterations"] > 0
    ):
        raise WorkflowError(
            "config key 'hemnma.reference_update.iterations': a reference update needs an atomic "
            "model as the first structure (fitted references share its labelled atoms)"
        )


def structures():
    """The configured structures: the main reference first, then any extra references."""
    s = config["structure"]
    return [s] if isinstance(s, str) else list(s)


def reference_structure(wildcards):
    """Structure of extra reference {r} (2, 3, ...)."""
    return structures()[int(wildcards.r) - 1]


def reference_files(name):
    """`name` (model.npz or modes.npz) of every reference, the main one first."""
    extra = range(2, len(structures()) + 1)
    return [res(f"model/{name}")] + [res(f"model/reference_{r}/{name}") for r in extra]


check_config_files()
check_sizes(config)  # subset, shards, n_val and n_test against the particle count

RES = config["results"]


def res(path):
    """A path under the results folder."""
    return f"{RES}/{path}"


def lock_results():
    """Lock the results folder for this run (flock, released when Snakemake exits).

    Snakemake locks only its working directory: another instance elsewhere with the same
    results folder would overwrite these results. The lock file names its holder.
    """
    import errno
    import fcntl
    import os
    import socket

    from snakemake.logging import logger

    path = Path(RES) / ".deephemnma.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            logger.warning(
                f"cannot lock {path} ({exc}): run one workflow per results folder"
            )
            return handle
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise WorkflowError(
            f"results folder '{path.parent.resolve()}' is in use by {holder} "
            "(another workflow instance); wait for it or set another 'results'"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} in {Path.cwd()}\n")
    handle.flush()
    return handle


RESULTS_LOCK = []


onstart:
    # real runs only (not dry runs); jobs submitted to a cluster run with --no-hooks
    if workflow.is_main_process:
        RESULTS_LOCK.append(lock_results())


def model_structure():
    """What prepare_model reads: the first structure, or its pseudo-atoms if it is an EM map."""
    s = structures()[0]
    return res("model/pseudo_atoms.pdb") if is_map(s) else s


PREPARE_MODEL_KEYS = [
    "atoms",
    "chains",
]  # config model: prepare-model's; the rest pseudo-atoms'


def prepare_model_args():
    """CLI arguments of `deephemnma prepare-model`: config model's atom selection."""
    return cli_flags({k: config["model"][k] for k in PREPARE_MODEL_KEYS})


def pseudo_atom_args():
    """CLI arguments of `deephemnma pseudo-atoms`: config model less the atom selection, its
    keys named after the pseudo-atoms (`pseudo_atoms` -> `--n-atoms`, ...); the width derived.
    """
    rename = {"pseudo_atoms": "n-atoms", "pseudo_atom_error": "target-error"}
    rename["map_threshold"] = "threshold"
    skip = PREPARE_MODEL_KEYS + ["pseudo_atom_sigma"]
    return cli_flags(config["model"], skip, rename) + ["--sigma", pseudo_atom_sigma()]


def pseudo_atom_sigma():
    """Width (Å) of the pseudo-atoms: model.pseudo_atom_sigma, else the map's voxel size."""
    from deephemnma.pseudo_atoms import voxel_size

    sigma = config["model"]["pseudo_atom_sigma"]
    return voxel_size(structures()[0]) if sigma is None else sigma


def nma_args():
    """CLI arguments of `deephemnma nma`: config nma (compare_to is also the rule's input)."""
    return cli_flags(config["nma"])


def quoted(items):
    """Shell-quoted, space-joined arguments for a shell: directive."""
    import shlex

    return " ".join(shlex.quote(str(i)) for i in items)


def simulate_args():
    """CLI arguments of `deephemnma simulate`: config particles.simulate."""
    return cli_flags(
        config["particles"]["simulate"], rename={"defocus_angstrom": "defocus"}
    )


def import_args():
    """CLI arguments of `deephemnma import`: config particles.import (the STAR is an input)."""
    return cli_flags(config["particles"]["import"], skip=["star"])


def shard_ids():
    """Indices of the HEMNMA shards."""
    return list(range(config["hemnma"]["shards"]))


def shard_args():
    """CLI arguments of `deephemnma shard`: the subset of config hemnma."""
    return cli_flags({k: config["hemnma"][k] for k in ("subset", "seed")})


def hemnma_args(start=None):
    """CLI arguments of `deephemnma hemnma`: config hemnma, less the keys of other rules
    (subset, seed and shards for shard, ranks for MPI, flag_z for gather, reference_update for
    fit); the local settings only for a local start. `start` replaces hemnma.start (the
    hybrid's: network)."""
    start = start or config["hemnma"]["start"]
    skip = ["subset", "seed", "shards", "ranks", "flag_z", "reference_update", "start"]
    skip += ["local"] if start == "search" else []
    args = cli_flags(config["hemnma"], skip) + (
        [] if start == "search" else ["--start", start]
    )
    return args + ["--sigma-angstrom", sigma_angstrom()]


def update_count():
    """Reference updates: HEMNMA passes after the first (hemnma.reference_update.iterations)."""
    return config["hemnma"]["reference_update"]["iterations"]


def update_groups():
    """Indices of the groups fitted at each reference update (one fitted reference each)."""
    c = config["hemnma"]["reference_update"]
    return [0] if c["grouping"] == "flagged" else list(range(c["n_groups"]))


def pass_references(name, p):
    """`name` (model.npz or modes.npz) of the references of HEMNMA pass `p`: the given ones,
    then after the first pass those fitted at reference update `p`."""
    fitted = [res(f"model/update_{p}/reference_{g}/{name}") for g in update_groups()]
    return reference_files(name) + (fitted if p > 0 else [])


def pass_input(name):
    """Input function: pass_references(name, p) of the job's pass {p}."""
    return lambda wildcards: pass_references(name, int(wildcards.p))


def pass_shards(wildcards):
    """The aligned shards of HEMNMA pass {p} (not the last)."""
    return expand(
        res("hemnma/pass_{p}/aligned/shard_{i}.star"), p=wildcards.p, i=shard_ids()
    )


def pass_star(p):
    """The gathered STAR of HEMNMA pass `p`: the last one is hemnma/hemnma.star."""
    return (
        res("hemnma/hemnma.star")
        if p == update_count()
        else res(f"hemnma/pass_{p}/hemnma.star")
    )


def update_star(wildcards):
    """The STAR reference update {u} groups: the pass before it."""
    return pass_star(int(wildcards.u) - 1)


def fit_args():
    """CLI arguments of `deephemnma fit`: config hemnma.reference_update (less the number of
    updates), the ANM settings of nma, and the number of given references."""
    args = cli_flags(
        config["hemnma"]["reference_update"],
        skip=["iterations"],
        rename={"fit_iterations": "iterations"},
    )
    n = config["nma"]
    args += [
        "--cutoff",
        n["cutoff"],
        "--gamma",
        n["gamma"],
        "--coarse-above",
        n["coarse_above"],
    ]
    return args + ["--originals", len(structures()), "--seed", config["hemnma"]["seed"]]


def hybrid_args():
    """CLI arguments of `deephemnma hemnma` in hybrid_refine: HEMNMA's (the refinement,
    hemnma.local, and the global search of the escalated images), starting from the networks'
    answers."""
    return hemnma_args("network") + ["--escalate", config["hybrid"]["escalate"]]


def hybrid_enabled():
    """Whether network/hybrid.star is made by default (enabled, and some images lack HEMNMA
    values)."""
    return config["hybrid"]["enabled"] and config["hemnma"]["subset"] is not None


def hybrid_shard_ids():
    """Indices of the hybrid shards."""
    return list(range(config["hybrid"]["shards"]))


def hybrid_select_args():
    """CLI arguments of `deephemnma hybrid select`."""
    return cli_flags(
        config["hybrid"], skip=["enabled", "shards", "candidates", "escalate"]
    )


def candidate_args(wildcards):
    """`infer --candidates` for the so3grid angle network when the hybrid refines from it."""
    so3grid = config["network"]["angle_repr"] == "so3grid"
    if wildcards.param != "angles" or not so3grid or not hybrid_enabled():
        return ""
    return quoted(["--candidates", config["hybrid"]["candidates"]])


def sigma_angstrom():
    """Atom Gaussian width: the simulator's when particles are simulated, else the
    pseudo-atoms' for an EM map, else 1 Å."""
    if config["particles"]["source"] == "simulate":
        return config["particles"]["simulate"]["sigma_angstrom"]
    return pseudo_atom_sigma() if is_map(structures()[0]) else 1.0


def label_star():
    """The labelled particle STAR the networks learn from: HEMNMA's, or the simulated truth."""
    if config["network"]["label_source"] == "truth":
        return res("particles/particles.star")
    return res("hemnma/hemnma.star")


def network_params():
    """Parameter types with a network of their own."""
    return config["network"]["params"]


def split_args():
    """CLI arguments of `deephemnma split`."""
    c = config["network"]
    return cli_flags({k: c[k] for k in ("n_val", "n_test", "seed")})


def train_args():
    """CLI arguments of `deephemnma train`: config network, less the keys of other rules."""
    skip = [
        "label_source",
        "params",
        "max_error_ratio",
        "n_test",
        "n_val",
        "infer_batch",
        "turns",
    ]
    skip += ["pretrain.images"] + ([] if pretraining() else ["pretrain.epochs"])
    return cli_flags(config["network"], skip)


def infer_args():
    """CLI arguments of `deephemnma infer`."""
    c = config["network"]
    keys = ("infer_batch", "workers", "turns")
    return cli_flags({k: c[k] for k in keys}, rename={"infer_batch": "batch"})


def quality_args():
    """CLI arguments of `deephemnma quality`."""
    c = config["network"]
    keys = ("label_source", "max_error_ratio")
    return cli_flags({k: c[k] for k in keys}, rename={"max_error_ratio": "max-ratio"})


def amplitude_views(wildcards):
    """Whether network {param} is an amplitude network shown the reference's views."""
    return wildcards.param == "amplitudes" and config["network"]["views"]


def views_train_args(wildcards, input):
    """The flexible model an amplitude network with views is trained with."""
    if not amplitude_views(wildcards):
        return ""
    args = ["--model", input.model, "--modes", input.modes]
    return quoted(args + ["--sigma-angstrom", sigma_angstrom()])


def pose_inputs(wildcards):
    """The angle and shift networks' answers an amplitude network with views is shown."""
    if not amplitude_views(wildcards):
        return []
    return [res(f"network/{p}/inferred.star") for p in ("angles", "shifts")]


def pretraining():
    """Whether the networks are pretrained on synthetic images."""
    p = config["network"]["pretrain"]
    return p["images"] > 0 and p["epochs"] > 0


def synthetic_input():
    """The synthetic pretraining set train reads (none without pretraining)."""
    files = ["images.npy", "labels.npz", "meta.json"]
    return [res(f"network/synthetic/{f}") for f in files] if pretraining() else []


def synthesize_args():
    """CLI arguments of `deephemnma synthesize`: network.pretrain.images, network.seed and .box,
    the atoms' width."""
    c = config["network"]
    n_images = c["pretrain"]["images"]
    return cli_flags(
        {
            "n_images": n_images,
            "seed": c["seed"],
            "box": c["box"],
            "sigma_angstrom": sigma_angstrom(),
        }
    )


def output_dir(wildcards, output):
    """Folder of a rule's first output."""
    return str(Path(output[0]).parent)


def space_input():
    """Amplitudes of all images: merged (HEMNMA's where it aligned, the networks' elsewhere),
    HEMNMA's alone, or the hybrid's (the merged STAR when HEMNMA aligned every image: nothing
    to refine)."""
    source = config["analysis"]["source"]
    if source == "hemnma":
        return res("hemnma/hemnma.star")
    if source == "hybrid" and hybrid_enabled():
        return res("network/hybrid.star")
    return res("network/deephemnma.star")


def path_outputs():
    """The trajectory between two groups, when analysis.path.groups names them."""
    if config["analysis"]["path"]["groups"] is None:
        return []
    return [res("space/trajectory_path.pdb"), res("space/trajectory_path.csv")]


def exported():
    """Whether groups are exported back to the original RELION particles (imported data)."""
    return config["particles"]["source"] == "import"


def reconstruct_star(wildcards):
    """The STAR a group is reconstructed from: the working images, or the original particles
    (analysis.reconstruct.box: original) through the exported STAR."""
    if exported() and config["analysis"]["reconstruct"]["box"] == "original":
        return res(f"export/group_{wildcards.g}.star")
    return res(f"space/group_{wildcards.g}.star")


def stack_roots():
    """Folders the original particles' stack paths resolve against (besides the working dir)."""
    if not exported():
        return []
    c = config["particles"]["import"]
    return [str(Path(c["star"]).resolve().parent)] + (
        [] if c["datadir"] is None else [c["datadir"]]
    )


def group_ids():
    """Indices of the groups picked in the conformational space."""
    g = config["analysis"]["groups"]
    return list(range(g["n_groups"] if g["method"] == "kmeans" else len(g["boxes"])))


def space_args():
    """CLI arguments of `deephemnma space`: config analysis less the keys of other rules (source:
    the input, reconstruct), the boxes as JSON."""
    import json

    rename = {"groups.method": "method", "groups.n_groups": "n-groups"}
    rename |= {"trajectory_frames": "frames", "trajectory_span_std": "span-std"}
    rename["free_energy_bins"] = "bins"
    skip = ["source", "reconstruct", "groups.boxes"]
    boxes = json.dumps(config["analysis"]["groups"]["boxes"])
    return cli_flags(config["analysis"], skip, rename) + ["--boxes", boxes]


def reconstruct_args():
    """CLI arguments of `deephemnma reconstruct`: config analysis.reconstruct (box: the input)."""
    return cli_flags(config["analysis"]["reconstruct"], skip=["box"])


def all_outputs():
    """Final targets of the workflow."""
    return (
        [
            res("model/modes.npz"),
            res("model/modes.nmd"),
            res("model/anim"),
            res("particles/particles.star"),
            res("hemnma/hemnma.star"),
            res("network/deephemnma.star"),
            *([res("network/hybrid.star")] if hybrid_enabled() else []),
            res("space/pca.npz"),
            expand(res("fsc/group_{g}.json"), g=group_ids()),
        ]
        + ([res("evaluate/accuracy.md")] if simulated() else [])
        + (expand(res("export/group_{g}.star"), g=group_ids()) if exported() else [])
    )


def simulated():
    """Whether the particles are simulated (ground truth exists)."""
    return config["particles"]["source"] == "simulate"
