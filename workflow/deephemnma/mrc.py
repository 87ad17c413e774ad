"""MRC files: maps and image stacks (read memory-mapped, validated; written atomically), the
images named by a STAR's `_rlnImageName` (`idx@stack`, 1-based) and the streaming stack writer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from .files import InputError, atomic_path, require_file, temp_beside


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
