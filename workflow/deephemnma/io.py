"""File I/O shared by all stages: atomic writes, MRC stacks, RELION STAR files, clear input errors."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

log = logging.getLogger(__name__)


class InputError(Exception):
    """A problem with a user-supplied file or value; the message names the file and the problem."""


def temp_beside(path: Path) -> Path:
    """A new hidden temporary file `.{name}.*{suffix}` beside `path`.

    Temporary files of `path` left by a killed writer are removed first (they can be large).
    """
    pattern = f"{glob.escape(f'.{path.name}.')}*{glob.escape(path.suffix)}"
    for stale in path.parent.glob(pattern):
        log.info("removing %s, left by an interrupted write of %s", stale, path.name)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (imported lazily: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise InputError if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} does not exist")
    return path


# ----------------------------------------------------------------------------- MRC


def write_mrc(path: str | os.PathLike, data: np.ndarray, pixel_size: float) -> None:
    """Write a 2D image, an image stack (N, Y, X) or a volume (Z, Y, X) atomically as float32."""
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            mrc.voxel_size = pixel_size
            if data.ndim == 3 and Path(path).suffix == ".mrcs":
                mrc.set_image_stack()


def open_mrc(path: Path, opener=mrcfile.open):
    """Open an MRC file read-only with `opener` (mrcfile.open or mrcfile.mmap).

    Raises InputError naming the file on any mrcfile error or warning: a header whose mode and
    size do not match the file's is only a warning to mrcfile (and its data would be misread).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return opener(path, mode="r", permissive=False)
    except Exception as exc:  # ValueError/OSError for corrupt headers, RuntimeWarning for sizes
        raise InputError(f"{path}: not a valid MRC file ({exc})") from exc


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an MRC/MRCS stack read-only as a (N, Y, X) array; InputError if unreadable."""
    path = require_file(path, "MRC stack")
    data = open_mrc(path, mrcfile.mmap).data
    if data is None:
        raise InputError(f"{path}: MRC file has no data (truncated?)")
    return data[None] if data.ndim == 2 else data


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a whole MRC (map or image) into memory; return (data, voxel size in Å)."""
    path = require_file(path, "MRC file")
    with open_mrc(path) as mrc:
        return np.array(mrc.data, dtype=np.float32), float(mrc.voxel_size.x)


# ----------------------------------------------------------------------------- STAR

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


def uncertainty_column(param: str) -> str:
    """STAR column holding a network's per-image uncertainty for a parameter type (e.g. angles)."""
    return f"dhUncertainty{param.capitalize()}"


def amplitude_modes(particles: pd.DataFrame, prefix: str = "dhAmplitudeMode") -> list[int]:
    """Mode numbers that have an amplitude column with `prefix` in a particle table, sorted."""
    return sorted(int(c[len(prefix) :]) for c in particles.columns if c.startswith(prefix))


def read_star(
    path: str | os.PathLike, required: list[str] | None = None
) -> dict[str, pd.DataFrame]:
    """Read a RELION STAR into {'optics': df, 'particles': df} (RELION 3.0 files get no optics).

    Raises InputError if the file cannot be parsed, `required` particle columns are missing or a
    numeric column holds something else than finite numbers (check_numeric).
    """
    path = require_file(path, "STAR file")
    try:
        blocks = starfile.read(path, always_dict=True)
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
    """Rows of a STAR's particle table (data_particles, or the only block), counted line by line
    without parsing the values; None if there is no such table."""
    rows: dict[str, int] = {}
    block = None
    with open(path) as fh:
        for line in fh:
            word = line.lstrip()[:5]
            if word.startswith("data_"):
                block = line.strip()
                rows[block] = 0
            elif block and word and word[0] not in "#_" and word != "loop_":
                rows[block] += 1
    if "data_particles" in rows:
        return rows["data_particles"]
    return next(iter(rows.values())) if len(rows) == 1 else None


def write_star(path: str | os.PathLike, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    """Write a RELION 3.1 STAR (data_optics + data_particles) atomically."""
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, overwrite=True)


def split_image_name(names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx@stack` image names into (0-based indices, stack paths)."""
    parts = names.astype(str).str.split("@", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        bad = names[parts[1].isna()].iloc[0] if parts.shape[1] == 2 else names.iloc[0]
        raise InputError(f"rlnImageName '{bad}' is not of the form index@stack")
    return parts[0].astype(int).to_numpy() - 1, parts[1].to_numpy()


class ParticleImages:
    """Lazy, memory-mapped access to the images named by a STAR's rlnImageName column.

    Stack paths are resolved against `roots` in order (first existing wins).
    """

    def __init__(self, names: pd.Series, roots: list[Path]):
        self.names = names
        self.index, stacks = split_image_name(names)
        self._stacks: dict[str, np.ndarray] = {}
        self.stack_of = np.empty(len(stacks), dtype=object)
        for name in pd.unique(stacks):
            resolved = self._resolve(name, roots)
            arr = open_stack(resolved)
            if arr.shape[1] != arr.shape[2]:
                raise InputError(
                    f"{resolved}: images are {arr.shape[2]}x{arr.shape[1]} pixels; "
                    "square images are required"
                )
            self._stacks[name] = arr
            sel = stacks == name
            self.stack_of[sel] = name
            too_big = self.index[sel] >= arr.shape[0]
            if too_big.any():
                raise InputError(
                    f"{resolved}: image index {self.index[sel][too_big][0] + 1} is beyond the "
                    f"stack's {arr.shape[0]} images"
                )
            if (self.index[sel] < 0).any():
                raise InputError(f"{resolved}: image indices must be 1-based and positive")
        shapes = {a.shape[1:] for a in self._stacks.values()}
        if len(shapes) != 1:
            raise InputError(f"particle stacks have mixed box sizes: {sorted(shapes)}")
        self.box = int(next(iter(shapes))[0])

    @staticmethod
    def _resolve(name: str, roots: list[Path]) -> Path:
        candidates = [Path(name)] if Path(name).is_absolute() else [r / name for r in roots]
        for cand in candidates:
            if cand.is_file():
                return cand
        tried = ", ".join(str(c) for c in candidates)
        raise InputError(f"particle stack '{name}' not found (tried {tried})")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
        """Images for the given rows as a float32 (B, D, D) array; InputError on NaN/Inf pixels."""
        rows = np.arange(*rows.indices(len(self))) if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(rows), self.box, self.box), dtype=np.float32)
        for name, arr in self._stacks.items():
            sel = np.nonzero(self.stack_of[rows] == name)[0]
            if len(sel):
                idx = self.index[rows[sel]]
                order = np.argsort(idx)
                out[sel[order]] = arr[idx[order]]
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            name = self.names.iloc[rows[int(np.argmin(finite))]]
            raise InputError(f"image {name} contains NaN or Inf pixels")
        return out


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


class StackWriter:
    """Stream images into MRCS stacks of at most `per_stack` images, each written atomically.

    ``names`` collects the RELION image names (``idx@path``, path relative to the working dir).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        n_images: int,
        box: int,
        pixel_size: float,
        per_stack: int,
        prefix: str = "stack",
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n, self.box, self.px, self.per = n_images, box, pixel_size, per_stack
        self.prefix = prefix
        self.written = 0
        self.names: list[str] = []
        self._mrc = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._pos = 0

    def stack_paths(self) -> list[Path]:
        n_stacks = -(-self.n // self.per)
        return [self.folder / f"{self.prefix}_{i:04d}.mrcs" for i in range(n_stacks)]

    def _open_next(self) -> None:
        i = self.written // self.per
        count = min(self.per, self.n - self.written)
        self._final = self.stack_paths()[i]
        self._tmp = temp_beside(self._final)
        self._mrc = mrcfile.new_mmap(
            self._tmp, shape=(count, self.box, self.box), mrc_mode=2, overwrite=True
        )
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.px
        self._pos = 0

    def _close(self) -> None:
        self._mrc.update_header_stats()
        self._mrc.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self._final)
        self._mrc = None

    def write(self, images: np.ndarray) -> None:
        """Append a batch (B, box, box)."""
        i = 0
        while i < len(images):
            if self._mrc is None:
                self._open_next()
            room = self._mrc.data.shape[0] - self._pos
            take = min(room, len(images) - i)
            self._mrc.data[self._pos : self._pos + take] = images[i : i + take]
            rel = os.path.relpath(self._final, Path.cwd())
            self.names += [f"{self._pos + j + 1:06d}@{rel}" for j in range(take)]
            self._pos += take
            self.written += take
            i += take
            if self._pos == self._mrc.data.shape[0]:
                self._close()

    def abort(self) -> None:
        """Remove a partially written stack."""
        if self._mrc is not None:
            self._mrc.close()
            self._tmp.unlink(missing_ok=True)
            self._mrc = None
