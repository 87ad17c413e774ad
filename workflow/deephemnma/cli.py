"""The `deephemnma` command: one verb per workflow stage (`deephemnma --help` lists them)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .files import InputError

# verb -> (module, one-line help)
VERBS = {
    "pseudo-atoms": ("pseudo_atoms", "EM map -> Gaussian pseudo-atoms (PDB) to a stated accuracy"),
    "prepare-model": (
        "model",
        "atomic model or pseudo-atoms (PDB/mmCIF) -> centred model.npz + PDB",
    ),
    "nma": ("nma", "ANM normal modes in HEMNMA units (modes.npz, .nmd, table, animations)"),
    "import": ("relion", "import a RELION 3.0/3.1 particle STAR + stacks (validated, normalised)"),
    "shard": ("shard", "choose the HEMNMA (sub)set and split it into shard STARs"),
    "hemnma": ("hemnma", "HEMNMA elastic alignment of a particle shard (MPI-parallel)"),
    "gather": ("gather", "merge aligned HEMNMA shards into one STAR"),
    "fit": (
        "fit",
        "reference update: a group's map (or a given map), the reference flexibly fitted into it",
    ),
    "split": ("split", "seeded train/validation/test lists over the labelled images"),
    "synthesize": (
        "synthesize",
        "pretraining images rendered from the model with the data's CTF and noise",
    ),
    "train": ("train", "train one network per parameter type (amplitudes, angles, shifts)"),
    "infer": ("infer", "infer one parameter type for every image with a trained network"),
    "quality": (
        "quality",
        "verdicts: does each network beat its trivial baseline on held-out images?",
    ),
    "merge": ("merge", "merge the inferred parameter types into one RELION STAR"),
    "hybrid": (
        "hybrid",
        "hybrid DeepHEMNMA: pick images to refine from the networks' answers; combine the results",
    ),
    "evaluate": ("evaluate", "accuracy tables against ground truth (paper Tables 1, S1, S2)"),
    "space": ("space", "PCA of the amplitudes, groups, centroid models and trajectories"),
    "export": ("export", "a group back to RELION: original images, box, pixel size and columns"),
    "reconstruct": ("reconstruct", "direct Fourier reconstruction of a group (half-maps, map)"),
    "fsc": ("fsc", "FSC of half-maps and against the centroid model's map; resolutions"),
    "simulate": ("simulate", "simulated particles with ground truth (MRCS stacks + RELION STAR)"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help, where it means something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # store_true/false: the flag is the setting; a --x/--no-x switch shows its default
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if (
            "%(default)" in text
            or action.required
            or flag
            or action.default in (None, "==SUPPRESS==")
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only the module of `verb` is imported when one is given."""
    parser = argparse.ArgumentParser(prog="deephemnma", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module, text) in VERBS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if verb in (None, name):
            mod = importlib.import_module(f"deephemnma.{module}")
            mod.add_args(p)
            p.set_defaults(module=mod)
    return parser


def one_line(exc: InputError) -> str:
    """The message of `exc`; for one re-raised by a DataLoader worker (with the worker's
    traceback), the original message from the traceback's last line."""
    text = str(exc).strip()
    if text.startswith("Caught InputError in DataLoader worker"):
        return text.splitlines()[-1].removeprefix(f"{InputError.__module__}.InputError: ")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if a in VERBS), None)
    args = build_parser(verb).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    env = os.environ
    if "SLURM_JOB_ID" in env:
        logging.getLogger("deephemnma").info(
            "SLURM job %s: partition=%s ntasks=%s cpus_per_task=%s gpus=%s",
            env["SLURM_JOB_ID"],
            env.get("SLURM_JOB_PARTITION"),
            env.get("SLURM_NTASKS"),
            env.get("SLURM_CPUS_PER_TASK"),
            env.get("SLURM_GPUS", env.get("CUDA_VISIBLE_DEVICES")),
        )
    try:
        args.module.main(args)
    except InputError as exc:
        print(f"deephemnma {args.verb}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
