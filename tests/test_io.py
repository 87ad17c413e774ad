"""The shared reader and writer (deephemnma.io): atomic writes and input checks."""

import logging

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from deephemnma.cli import one_line
from deephemnma.files import InputError, atomic_path
from deephemnma.io import count_star_rows, optics_table, read_star, read_star_blocks, write_star
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


STAR_BY_HAND = """
# RELION-style header comment
data_general

_rlnFinalResolution   3.5
_rlnModelName         'run it1'
_rlnNrClasses         2

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnImagePixelSize #3
opticsGroup1 1 1.1

data_empty

loop_
_rlnAngleRot #1

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnClassNumber #3
_rlnMicrographName #4

1@a.mrcs  12000.5 1 "mic 1.mrc"
2@a.mrcs  -3e2    2 mic2.mrc

# a comment between rows
3@a.mrcs  nan     3 mic3.mrc
"""


def test_streaming_star_reader_equals_starfile(tmp_path):
    """`read_star_blocks` (the rows parsed by pandas from the file) returns what starfile does:
    simple blocks, loops, empty loops, comments, blank lines, quotes, NaN, our own STARs, RELION
    3.0 single-block files and odd ones; rows longer than the loop's columns are an error."""
    (tmp_path / "hand.star").write_text(STAR_BY_HAND, encoding="utf-8")
    rng = np.random.default_rng(0)
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i}@s.mrcs" for i in range(1, 301)],
            "rlnAngleRot": rng.uniform(-180, 180, 300),
            "rlnOpticsGroup": 1,
            "dhSourceAmplitudes": rng.choice(["network", "hemnma"], 300),
        }
    )
    write_star(tmp_path / "31.star", optics_table(1.0, 8, 300.0, 2.7, 0.1), parts)
    starfile.write(parts, tmp_path / "30.star")
    head = "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnClassNumber #3\n"
    odd = {  # what other tools write: a stray quote before the rows, a BOM, CRLF, quotes, a short row
        "quote_in_comment.star": '# from "tool\n' + head + "1@a 1.5 1\n2@a 2.5 2\n",
        "bom.star": "\ufeff" + head + "1@a 1.5 1\n",
        "crlf.star": (head + "1@a 1.5 1\n2@a 2.5 2\n").replace("\n", "\r\n"),
        "single_quotes.star": head + "'1@a x' 1.5 1\n2@a 2.5 2\n",
        "mixed_block.star": "data_particles\n_rlnFoo 3\nloop_\n_rlnImageName #1\n1@a\n",
        "short_row.star": head + "1@a 1.5 1\n2@a 2.5\n",
    }
    for name, text in odd.items():
        (tmp_path / name).write_bytes(text.encode())
    for name in ("hand.star", "31.star", "30.star", *odd):
        want = starfile.read(tmp_path / name, always_dict=True)
        got = read_star_blocks(tmp_path / name)
        assert list(got) == list(want)
        for key, block in want.items():
            if isinstance(block, dict):
                assert got[key] == block
            elif block.empty:
                assert got[key].empty and list(got[key].columns) == list(block.columns)
            else:
                pd.testing.assert_frame_equal(got[key], block, check_dtype=True)
    (tmp_path / "long_rows.star").write_text(head + "1@a 1.5 1 9\n2@a 2.5 2 9\n", encoding="utf-8")
    with pytest.raises(InputError, match="long_rows.star: cannot parse STAR file.*4 fields"):
        read_star(tmp_path / "long_rows.star")
    hand = read_star_blocks(tmp_path / "hand.star")
    assert hand["particles"]["rlnMicrographName"][0] == "mic 1.mrc"
    assert np.isnan(hand["particles"]["rlnDefocusU"][2]) and len(hand["particles"]) == 3


def test_streaming_star_writer_writes_what_starfile_writes(tmp_path):
    """`write_star` (tables streamed through pandas) writes starfile's file line for line
    (all but the first, a comment naming the writer): floats, ints, NaN, text with spaces or
    empty; and starfile reads it back."""
    rng = np.random.default_rng(1)
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i}@s.mrcs" for i in range(1, 201)],
            "rlnAngleRot": rng.uniform(-180, 180, 200),
            "rlnClassNumber": rng.integers(1, 4, 200),
            "rlnMicrographName": rng.choice(["mic 1.mrc", "", "m2.mrc"], 200),
            "dhUncertaintyAngles": np.where(rng.random(200) < 0.1, np.nan, rng.random(200)),
        }
    )
    optics = optics_table(1.0, 8, 300.0, 2.7, 0.1)
    write_star(tmp_path / "ours.star", optics, parts)
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "theirs.star")
    ours = (tmp_path / "ours.star").read_text(encoding="utf-8").splitlines()
    theirs = (tmp_path / "theirs.star").read_text(encoding="utf-8").splitlines()
    assert ours[0].startswith("# Created by DeepHEMNMA") and ours[1:] == theirs[1:]
    back = starfile.read(tmp_path / "ours.star")["particles"]
    assert back["rlnMicrographName"].tolist()[:5] == parts["rlnMicrographName"].tolist()[:5]
    np.testing.assert_allclose(back["rlnAngleRot"], parts["rlnAngleRot"], atol=1e-6)


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
