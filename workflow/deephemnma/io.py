"""RELION STAR files and the particle set: reading (validated, RELION 3.0 and 3.1) and writing
STAR files, the column conventions (pose, origin sign, amplitude and uncertainty columns, optics)
and `ParticleSet`, a particle STAR with its images."""

from __future__ import annotations

import csv
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from . import __version__
from .files import InputError, atomic_path, require_file
from .mrc import ParticleImages

OPTICS_COLUMNS = [
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
]


# RELION columns that hold numbers (those we read or carry) and our dh* columns that do not
NUMERIC_COLUMNS = {
    *OPTICS_COLUMNS,
    "rlnImageDimensionality",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnAngleRotPrior",
    "rlnAngleTiltPrior",
    "rlnAnglePsiPrior",
    "rlnOriginXPrior",
    "rlnOriginYPrior",
    "rlnOriginXPriorAngst",
    "rlnOriginYPriorAngst",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnRandomSubset",
}
TEXT_DH_PREFIX = "dhSource"  # dhSource<...> columns hold text (image names, origins)


def check_numeric(path: Path, table: pd.DataFrame, what: str) -> pd.DataFrame:
    """`table` with its numeric columns (NUMERIC_COLUMNS, dh*) as numbers.

    Raises InputError naming the row (its rlnImageName, else `what` and row number) and column
    of the first value that is not a finite number.
    """
    for col in table.columns:
        own = col.startswith("dh") and not col.startswith(TEXT_DH_PREFIX)
        if col not in NUMERIC_COLUMNS and not own:
            continue
        values = pd.to_numeric(table[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(np.float64))
        if bad.any():
            i = int(np.argmax(bad))
            row = table["rlnImageName"].iloc[i] if "rlnImageName" in table else f"row {i + 1}"
            raise InputError(
                f"{path}: {what} {row} has _{col} '{table[col].iloc[i]}', not a finite number"
            )
        table[col] = values
    return table


def amplitude_column(mode: int) -> str:
    """STAR column holding the amplitude of normal mode `mode` (e.g. 7)."""
    return f"dhAmplitudeMode{mode}"


# per image, the correlation of the image with the flexible model at the networks' answer (pose
# and amplitudes; written by `infer --model --modes` for an amplitude network with views): low
# when the answer does not explain the image
AGREEMENT_COLUMN = "dhModelAgreement"

# per image, how far a short local refinement of that correlation moves the networks' shift
# (pixels) and amplitudes (mean over modes), written with the agreement: large when the answer is off
DRIFT_COLUMNS = {"shifts": "dhModelShiftDrift", "amplitudes": "dhModelAmplitudeDrift"}


# per image, 1 when HEMNMA's quality flag (`gather`) says the model does not explain the image:
# its values are the model's best guess for something it cannot reach, so they are not used as
# network labels nor in the conformational space
FLAG_COLUMN = "dhFlagged"


def unflagged(particles: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows HEMNMA's quality flag does not mark (all rows without the
    column)."""
    if FLAG_COLUMN not in particles:
        return np.ones(len(particles), dtype=bool)
    return particles[FLAG_COLUMN].to_numpy(float) != 1


def trusted(particles: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows whose values can be used: not flagged by HEMNMA's quality flag
    and not marked `_dhTrusted 0` (merge, hybrid); every row of a table with neither column."""
    keep = unflagged(particles)
    if "dhTrusted" in particles:
        keep &= particles["dhTrusted"].to_numpy(float) == 1
    return keep


_CANDIDATE = re.compile(r"dhAngleCandidate(\d+)(?:Rot|Tilt|Psi)")


def candidate_columns(j: int) -> list[str]:
    """Euler-angle columns (rot, tilt, psi) of an angle network's j-th orientation candidate
    (j ≥ 2; the first is the answer in `_rlnAngle*`), written by `infer --candidates` and
    refined from by the hybrid: `_dhAngleCandidate<j>Rot` etc."""
    return [f"dhAngleCandidate{j}{name}" for name in ("Rot", "Tilt", "Psi")]


def candidate_numbers(particles: pd.DataFrame, path: str | os.PathLike) -> list[int]:
    """The candidate numbers j (sorted) of the `candidate_columns(j)` in the table of STAR
    `path`; InputError naming the file when a candidate lacks one of its three angles."""
    found = {int(m[1]) for c in particles.columns if (m := _CANDIDATE.fullmatch(c))}
    for j in sorted(found):
        lacking = [c for c in candidate_columns(j) if c not in particles]
        if lacking:
            raise InputError(
                f"{path}: orientation candidate {j} lacks {', '.join('_' + c for c in lacking)}"
            )
    return sorted(found)


def uncertainty_column(param: str) -> str:
    """STAR column holding a network's per-image uncertainty for a parameter type (e.g. angles)."""
    return f"dhUncertainty{param.capitalize()}"


def amplitude_modes(particles: pd.DataFrame, prefix: str = "dhAmplitudeMode") -> list[int]:
    """Mode numbers that have an amplitude column with `prefix` in a particle table, sorted."""
    return sorted(int(c[len(prefix) :]) for c in particles.columns if c.startswith(prefix))


@dataclass
class _Block:
    """One data_ block of a STAR file, as scanned: a loop's column names and where its rows are,
    and the block's key-value pairs."""

    loop: bool = False
    columns: list[str] = field(default_factory=list)
    offset: int = 0  # byte offset of the loop's first row
    rows: int = 0  # non-blank, non-comment lines in the loop body
    pairs: dict[str, str] = field(default_factory=dict)


def _number(text: str) -> int | float | str:
    """A simple block's value as a number where it is one (int, then float), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _scan(path: str | os.PathLike) -> tuple[dict[str, _Block], bool]:
    """The blocks of a STAR file, read line by line; and whether it needs starfile's parser
    (single-quoted values in a loop, or a block with both key-value pairs and a loop)."""
    blocks: dict[str, _Block] = {}
    block, header, unusual, offset = None, False, False, 0
    with open(path, "rb") as fh:
        for raw in fh:
            here, offset = offset, offset + len(raw)
            text = raw.decode("utf-8-sig" if here == 0 else "utf-8").strip()
            if text.startswith("data_"):
                block, header = blocks.setdefault(text[5:], _Block()), False
            elif block is None or not text or text[0] == "#":
                continue
            elif text.startswith("loop_") and not block.loop:
                block.loop, header = True, True
            elif block.loop and header and text[0] == "_":
                block.columns.append(text.split()[0][1:])
            elif block.loop:
                if header:
                    header, block.offset = False, here
                block.rows += 1
                unusual = unusual or "'" in text
            elif text[0] == "_":
                key, value = shlex.split(text)
                block.pairs[key[1:]] = value
    mixed = any(b.loop and b.pairs for b in blocks.values())
    return blocks, unusual or mixed


def _loop(path: str | os.PathLike, block: _Block) -> pd.DataFrame:
    """A scanned loop's rows, parsed by pandas' C reader from their byte offset; ValueError if a
    row has more fields than the loop has columns."""
    if block.rows == 0:
        return pd.DataFrame(columns=block.columns, dtype=float)
    with open(path, "rb") as fh:
        fh.seek(block.offset)
        table = pd.read_csv(
            fh,
            sep=r"\s+",
            header=None,
            nrows=block.rows,
            comment="#",
            keep_default_na=False,
            na_values=["nan", "NaN", "<NA>"],
            engine="c",
            encoding="utf-8",
        )
    if table.shape[1] != len(block.columns):
        raise ValueError(f"rows have {table.shape[1]} fields, the loop names {len(block.columns)}")
    table.columns = block.columns
    for c in table.columns:  # text that is all numbers (or empty: a short row) becomes numbers
        if not pd.api.types.is_numeric_dtype(table[c]):
            try:
                table[c] = pd.to_numeric(table[c])
            except (ValueError, TypeError):
                pass
    return table


def read_star_blocks(path: str | os.PathLike) -> dict[str, pd.DataFrame | dict]:
    """Every data_ block of a STAR file by name: loops as DataFrames, key-value blocks as dicts —
    what `starfile.read(path, always_dict=True)` returns, in a streaming form. The file is scanned
    once line by line, and each loop's rows are then parsed by pandas' C reader straight from the
    file: starfile's parser holds every line several times over (line cache, joined text, its
    copy) — about 3 kB per particle at 46 columns, 320 MB for 10⁵ particles, against 51 MB for the
    table itself. Files with single-quoted values in a loop, or a block that mixes key-value pairs
    and a loop, are left to starfile. Tested equal to starfile's result."""
    blocks, unusual = _scan(path)
    if unusual:
        return starfile.read(path, always_dict=True)
    return {
        name: _loop(path, b) if b.loop else {k: _number(v) for k, v in b.pairs.items()}
        for name, b in blocks.items()
    }


def read_star(
    path: str | os.PathLike, required: list[str] | None = None
) -> dict[str, pd.DataFrame]:
    """Read a RELION STAR into {'optics': df, 'particles': df} (RELION 3.0 files get no optics).

    Raises InputError if the file cannot be parsed, `required` particle columns are missing or a
    numeric column holds something else than finite numbers (check_numeric).
    """
    path = require_file(path, "STAR file")
    try:
        blocks = read_star_blocks(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot parse STAR file ({exc})") from exc
    if "particles" in blocks:
        particles = blocks["particles"]
        optics = blocks.get("optics")
    elif len(blocks) == 1:  # RELION 3.0: a single data_ block
        particles = next(iter(blocks.values()))
        optics = None
    else:
        raise InputError(f"{path}: no data_particles block (found {sorted(blocks)})")
    if not isinstance(particles, pd.DataFrame) or particles.empty:
        raise InputError(f"{path}: particle table is empty")
    missing = [c for c in required or [] if c not in particles.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join('_' + c for c in missing)}")
    if isinstance(optics, pd.DataFrame):
        optics = check_numeric(path, optics, "optics")
    return {"optics": optics, "particles": check_numeric(path, particles, "particle")}


def count_star_rows(path: str | os.PathLike) -> int | None:
    """Rows of a STAR's particle table (data_particles, or the only block), counted by the
    reader's line scan without parsing the values; None if there is no such table or the file
    cannot be scanned."""
    try:
        blocks, _ = _scan(path)
    except (ValueError, UnicodeDecodeError):
        return None
    if "particles" in blocks:
        return blocks["particles"].rows
    return next(iter(blocks.values())).rows if len(blocks) == 1 else None


def _quoted(column: pd.Series) -> pd.Series:
    """A text column with the values that hold a space, or are empty, in double quotes."""
    return column.map(lambda x: f'"{x}"' if isinstance(x, str) and (" " in x or not x) else x)


def write_star(
    path: str | os.PathLike, optics: pd.DataFrame | None, particles: pd.DataFrame
) -> None:
    """Write a RELION 3.1 STAR (data_optics, if given, + data_particles) atomically, laid out as
    `starfile.write` does (tab-separated, floats '%.6f', text with spaces quoted) but streamed:
    each table goes to the file through pandas' chunked CSV writer, where starfile builds the
    whole text in memory from a copy of the table with every cell a Python object (about
    2 kB per particle at 46 columns). Tested equal to starfile's file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"# Created by DeepHEMNMA {__version__}\n\n\n")
        for name, table in (("optics", optics), ("particles", particles)):
            if table is None:
                continue
            fh.write(f"data_{name}\n\nloop_\n")
            fh.writelines(f"_{c} #{i}\n" for i, c in enumerate(table.columns, 1))
            text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
            table = table.assign(**{c: _quoted(table[c]) for c in text}) if text else table
            table.to_csv(
                fh,
                sep="\t",
                header=False,
                index=False,
                float_format="%.6f",
                na_rep="<NA>",
                quoting=csv.QUOTE_NONE,
            )
            fh.write("\n\n")


def particle_images(
    star_path: str | os.PathLike, particles: pd.DataFrame, roots: list[Path] = ()
) -> ParticleImages:
    """Images of a particle table whose stacks are named relative to the working dir, the STAR's
    folder or one of `roots`."""
    star_dir = Path(star_path).resolve().parent
    return ParticleImages(particles["rlnImageName"], [Path.cwd(), star_dir, *roots])


# ----------------------------------------------------------------------------- particle sets

EULER_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGIN_COLUMNS = ["rlnOriginXAngst", "rlnOriginYAngst"]
POSE_COLUMNS = [*EULER_COLUMNS, *ORIGIN_COLUMNS]
CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"]


def pose_columns(
    euler: np.ndarray | None = None, shifts_px: np.ndarray | None = None, pixel_size: float = 1.0
) -> dict[str, np.ndarray]:
    """STAR pose columns of Euler angles (n, 3) in degrees and particle displacements d (n, 2) in
    pixels; RELION's origin is the offset that re-centres the particle: origin Å = −d · pixel size.
    """
    out = {}
    if euler is not None:
        out.update(zip(EULER_COLUMNS, np.asarray(euler).T, strict=True))
    if shifts_px is not None:
        out.update(zip(ORIGIN_COLUMNS, -np.asarray(shifts_px).T * pixel_size, strict=True))
    return out


def table_euler(table: pd.DataFrame) -> np.ndarray:
    """(n, 3) Euler angles in degrees of a STAR table."""
    return table[EULER_COLUMNS].to_numpy(np.float64)


def table_shifts_px(table: pd.DataFrame, pixel_size: float) -> np.ndarray:
    """(n, 2) particle displacements d in pixels of a STAR table (inverse of `pose_columns`)."""
    return -table[ORIGIN_COLUMNS].to_numpy(np.float64) / pixel_size


class ParticleSet:
    """A particle STAR (RELION 3.1, as written by our simulate/import) with its images.

    ``table`` is the particle table with the optics columns merged in per particle; ``images``
    reads them lazily (memory-mapped); stack paths resolve as in particle_images.
    """

    def __init__(self, star: str | os.PathLike, roots: list[Path] = ()):
        self.star = Path(star)
        blocks = read_star(self.star, required=["rlnImageName", "rlnOpticsGroup", *CTF_COLUMNS[:2]])
        optics, particles = blocks["optics"], blocks["particles"]
        if optics is None:
            raise InputError(f"{self.star}: no data_optics block (run `deephemnma import` first)")
        missing = [c for c in OPTICS_COLUMNS if c not in optics.columns]
        if missing:
            raise InputError(
                f"{self.star}: optics table lacks {', '.join('_' + c for c in missing)}"
            )
        self.optics = optics
        self.particles = particles
        self.table = particles.merge(optics, on="rlnOpticsGroup", how="left", suffixes=("", "_o"))
        if self.table["rlnImagePixelSize"].isna().any():
            raise InputError(f"{self.star}: particles refer to an optics group that does not exist")
        sizes = self.table["rlnImagePixelSize"].unique()
        if len(sizes) != 1:
            raise InputError(f"{self.star}: optics groups have different pixel sizes {sizes}")
        self.pixel_size = float(sizes[0])
        self.images = particle_images(self.star, particles, roots)
        box = int(optics["rlnImageSize"].iloc[0])
        if self.images.box != box:
            raise InputError(
                f"{self.star}: rlnImageSize {box} but the stacks hold {self.images.box}-pixel images"
            )
        self.box = box
        self.has_ctf = bool(optics.get("dhCtf", pd.Series([1])).iloc[0])

    def __len__(self) -> int:
        return len(self.particles)

    def euler(self, rows=slice(None)) -> np.ndarray:
        """(n, 3) Euler angles in degrees."""
        return table_euler(self.table)[rows]

    def shifts_px(self, rows=slice(None)) -> np.ndarray:
        """(n, 2) particle displacements d in pixels (origin = -d · pixel size)."""
        return table_shifts_px(self.table, self.pixel_size)[rows]

    def amplitudes(self, modes: list[int], rows=slice(None)) -> np.ndarray:
        """(n, K) normal-mode amplitudes from the dhAmplitudeMode<k> columns."""
        cols = [amplitude_column(k) for k in modes]
        missing = [c for c in cols if c not in self.table.columns]
        if missing:
            raise InputError(
                f"{self.star}: missing column(s) {', '.join('_' + c for c in missing)}"
            )
        return self.table[cols].to_numpy(np.float64)[rows]

    def ctf_params(self, rows=slice(None)) -> dict[str, np.ndarray]:
        """Per-particle CTF parameters (defocus in Å, angles in degrees, kV, mm)."""
        t = self.table.iloc[rows] if isinstance(rows, slice) else self.table.iloc[np.asarray(rows)]

        def get(col: str, default: float) -> np.ndarray:
            return t[col].to_numpy(np.float64) if col in t else np.full(len(t), default)

        return {
            "defocus_u": get("rlnDefocusU", 0.0),
            "defocus_v": get("rlnDefocusV", 0.0),
            "defocus_angle": get("rlnDefocusAngle", 0.0),
            "phase_shift": get("rlnPhaseShift", 0.0),
            "voltage_kv": get("rlnVoltage", 300.0),
            "cs_mm": get("rlnSphericalAberration", 2.7),
            "amplitude_contrast": get("rlnAmplitudeContrast", 0.1),
            "bfactor": get("rlnCtfBfactor", 0.0),
        }


def optics_table(
    pixel_size: float,
    box: int,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    has_ctf: bool = True,
) -> pd.DataFrame:
    """A one-group RELION 3.1 optics table (dhCtf = 0 marks CTF-free simulated images)."""
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [pixel_size],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [voltage_kv],
            "rlnSphericalAberration": [cs_mm],
            "rlnAmplitudeContrast": [amplitude_contrast],
            "dhCtf": [int(has_ctf)],
        }
    )
