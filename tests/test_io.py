"""The shared reader and writer (deephemnma.io): atomic writes and input checks."""

import logging

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma.cli import one_line
from deephemnma.files import InputError, atomic_path
from deephemnma.io import count_star_rows, optics_table, read_star, write_star
from deephemnma.mrc import ParticleImages, StackWriter, open_stack, read_mrc, write_mrc


def test_atomic_path_removes_temp_files_of_a_killed_write(tmp_path, caplog):
    stale = [tmp_path / ".checkpoint.pt.k1ll3d__.pt", tmp_path / ".checkpoint.pt.abc.pt"]
    others = [tmp_path / ".network.pt.k1ll3d__.pt", tmp_path / "checkpoint.pt.bak.pt"]
    for f in stale + others:
        f.write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="deephemnma.files"):
        with atomic_path(tmp_path / "checkpoint.pt") as tmp:
            tmp.write_bytes(b"new")
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.pt", *(p.name for p in others)]
    )
    assert "interrupted write of checkpoint.pt" in caplog.text
    assert all(str(p) in caplog.text for p in stale)


def test_stack_writer_removes_temp_stacks_of_a_killed_write(tmp_path):
    (tmp_path / ".stack_0000.mrcs.k1ll3d__.mrcs").write_bytes(b"partial")
    writer = StackWriter(tmp_path, 2, 8, 1.0, per_stack=2)
    writer.write(np.zeros((2, 8, 8), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["stack_0000.mrcs"]


def test_mrc_mode_that_does_not_match_the_file_size_is_an_error(tmp_path):
    path = tmp_path / "map.mrc"
    write_mrc(path, np.ones((4, 4, 4)), 1.0)
    raw = bytearray(path.read_bytes())
    raw[12:16] = np.int32(1).tobytes()  # mode 1 (int16) for float32 data
    path.write_bytes(bytes(raw))
    for read in (read_mrc, open_stack):
        with pytest.raises(
            InputError, match=r"map\.mrc: not a valid MRC file .*larger than expected"
        ):
            read(path)


def test_particle_images_with_nan_pixels_are_an_error_naming_the_image(tmp_path):
    imgs = np.zeros((4, 8, 8))
    imgs[2, 1, 1] = np.inf
    write_mrc(tmp_path / "s.mrcs", imgs, 1.0)
    images = ParticleImages(pd.Series([f"{i}@s.mrcs" for i in (4, 3, 2, 1)]), [tmp_path])
    assert images[[0, 3]].shape == (2, 8, 8)
    with pytest.raises(InputError, match=r"^image 3@s\.mrcs contains NaN or Inf pixels$"):
        images[0:4]
    # read in a DataLoader worker (train, infer), the CLI still reports it in one line
    batches = [[0, 1], [2, 3]]
    loader = torch.utils.data.DataLoader(images, batch_size=None, sampler=batches, num_workers=1)
    with pytest.raises(InputError) as err:
        list(loader)
    assert one_line(err.value) == "image 3@s.mrcs contains NaN or Inf pixels"


def test_count_star_rows_matches_the_parsed_particle_table(tmp_path):
    parts = pd.DataFrame({"rlnImageName": [f"{i}@s.mrcs" for i in range(1, 6)], "rlnDefocusU": 1.0})
    write_star(tmp_path / "31.star", optics_table(1.0, 8, 300.0, 2.7, 0.1), parts)
    starfile.write(parts, tmp_path / "30.star")
    for name in ("31.star", "30.star"):
        assert count_star_rows(tmp_path / name) == len(read_star(tmp_path / name)["particles"]) == 5


def test_flexible_model_loads_deforms_and_moves_to_torch(adk_model_files, tmp_path):
    """x = x0 + sum_k q_k v_k, batched, the same in numpy and torch; mismatched files are an
    InputError naming the modes file."""
    from deephemnma.flexible import FlexibleModel

    model = FlexibleModel.load(adk_model_files / "model.npz", adk_model_files / "modes.npz")
    assert model.n_modes == 3 and list(model.mode_numbers) == [7, 8, 9]
    q = np.array([[150.0, 0.0, 0.0], [10.0, -20.0, 30.0]])
    x = model.deform(q)
    expected = model.coords + sum(q[:, k, None, None] * model.modes[k] for k in range(3))
    np.testing.assert_allclose(x, expected, atol=1e-10)
    np.testing.assert_allclose(model.deform(q[1]), x[1], atol=1e-10)
    t = model.to(dtype=torch.float64)
    np.testing.assert_allclose(t.deform(torch.tensor(q)).numpy(), x, atol=1e-10)
    assert t.weights.dtype == torch.float64 and model.to().coords.dtype == torch.float32
    with np.load(adk_model_files / "modes.npz") as z:
        np.savez(tmp_path / "modes.npz", **{**z, "modes": z["modes"][:, :-1]})
    with pytest.raises(InputError, match="modes.npz: modes of"):
        FlexibleModel.load(adk_model_files / "model.npz", tmp_path / "modes.npz")
