import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from deephemnma import space


def test_pca_recovers_planted_line():
    rng = np.random.default_rng(0)
    direction = np.array([2.0, -1.0, 0.5])
    direction /= np.linalg.norm(direction)
    t = rng.uniform(-100, 100, size=(2000, 1))
    x = t * direction + rng.normal(scale=3.0, size=(2000, 3)) + [10, 20, 30]
    pca = space.PCA.fit(x)
    assert abs(pca.components[0] @ direction) > 0.999
    assert pca.explained[0] > 0.98
    np.testing.assert_allclose(pca.mean, x.mean(0))
    np.testing.assert_allclose(pca.inverse(pca.transform(x)), x, atol=1e-9)
    np.testing.assert_allclose(np.abs(pca.transform(x)[:, 0]), np.abs(t[:, 0] - t.mean()), atol=12)


def test_kmeans_recovers_three_clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[-100.0, 0, 50], [80, 90, -40], [60, -120, 0]])
    truth = rng.integers(3, size=1500)
    x = centres[truth] + rng.normal(scale=15.0, size=(1500, 3))
    pca = space.PCA.fit(x)
    labels = space.kmeans_groups(pca.transform(x), 3)
    ari = adjusted_rand_score(truth, labels)
    print(f"adjusted Rand index: {ari:.3f}")
    assert ari >= 0.9
    # ordered by PC1 centroid
    c1 = [pca.transform(x)[labels == g, 0].mean() for g in range(3)]
    assert c1 == sorted(c1)


def test_box_groups():
    coords = np.array([[-500.0, 0], [-50, 10], [200, 800], [200, 1000]])
    boxes = [{"pc1": [-900, -100], "pc2": [-900, 900]}, {"pc1": [-100, 900], "pc2": [-900, 900]}]
    assert space.box_groups(coords, boxes).tolist() == [0, 1, 1, -1]


def test_space_cli_writes_groups_and_trajectories(adk_model_files, tmp_path):
    import starfile

    from deephemnma.cli import main as cli
    from deephemnma.io import optics_table, write_star
    from deephemnma.model import read_structure

    rng = np.random.default_rng(2)
    n = 300
    amps = np.repeat([[-100.0, 0, 0], [100.0, 50, 0]], n // 2, 0) + rng.normal(scale=5, size=(n, 3))
    import pandas as pd

    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@s.mrcs" for i in range(n)],
            "rlnOpticsGroup": 1,
            "dhAmplitudeMode7": amps[:, 0],
            "dhAmplitudeMode8": amps[:, 1],
            "dhAmplitudeMode9": amps[:, 2],
            "dhSourceAmplitudes": np.where(np.arange(n) % 3 == 0, "hemnma", "network"),
        }
    )
    write_star(tmp_path / "in.star", optics_table(2.2, 64, 200, 2, 0.1), parts)
    rc = cli(
        [
            "space",
            "--particles",
            str(tmp_path / "in.star"),
            "--modes",
            str(adk_model_files / "modes.npz"),
            "--pdb",
            str(adk_model_files / "model.pdb"),
            "--n-groups",
            "2",
            "--frames",
            "5",
            "--path-groups",
            "0",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    g0 = starfile.read(tmp_path / "out/group_0.star")["particles"]
    assert len(g0) == n // 2 and (g0["dhAmplitudeMode7"] < 0).all()  # lower PC1 first
    groups = pd.read_csv(tmp_path / "out/groups.csv")
    assert groups["centroid_mode7"].tolist() == pytest.approx([-100, 100], abs=2)
    assert (groups["images_hemnma"] + groups["images_network"] == groups["images"]).all()
    assert groups["images_hemnma"].sum() == n // 3
    table = pd.read_csv(tmp_path / "out/space.csv")
    assert (table["source"] == parts["dhSourceAmplitudes"]).all()
    fe = pd.read_csv(tmp_path / "out/free_energy.csv")
    assert set(fe["plane"]) == {"PC1/PC2", "PC1/PC3"} and fe["images"].sum() == 2 * n
    assert (tmp_path / "out/free_energy.png").stat().st_size > 1000
    path = pd.read_csv(tmp_path / "out/trajectory_path.csv")
    assert len(path) == 5 and path["PC1"].iloc[0] < 0 < path["PC1"].iloc[-1]
    assert read_structure(tmp_path / "out/trajectory_path.pdb").numCoordsets() == 5
    traj = read_structure(tmp_path / "out/trajectory_pc1.pdb")
    assert traj.numCoordsets() == 5
    # the trajectory spans ±2 std along PC1, i.e. about ±2 * 112 in amplitude (mostly mode 7)
    disp = np.sqrt(((traj.getCoordsets()[-1] - traj.getCoordsets()[0]) ** 2).sum(1).mean())
    assert 2.0 < disp < 20.0


def test_selections_with_ranges_on_any_pc_and_logical_expressions():
    rng = np.random.default_rng(3)
    c = rng.uniform(-10, 10, size=(500, 3))
    where = "PC1 < 0 and (PC2 > 5 or PC3 <= -2)"
    truth = (c[:, 0] < 0) & ((c[:, 1] > 5) | (c[:, 2] <= -2))
    assert (space.in_box(c, {"where": where}) == truth).all()
    both = space.in_box(c, {"pc3": [0, 4], "where": "PC1 > 0 or PC2 > 0"})
    assert (both == ((c[:, 2] >= 0) & (c[:, 2] <= 4) & ((c[:, 0] > 0) | (c[:, 1] > 0)))).all()
    labels = space.box_groups(c, [{"where": "PC1 > 5"}, {"pc1": [0, 10]}])
    assert (labels[c[:, 0] > 5] == 0).all() and (labels[(c[:, 0] >= 0) & (c[:, 0] <= 5)] == 1).all()
    assert (labels[c[:, 0] < 0] == -1).all()
    with pytest.raises(space.InputError, match="selection 'PC9 > 0'"):
        space.in_box(c, {"where": "PC9 > 0"})
    with pytest.raises(space.InputError, match="not one of pc1..pc3"):
        space.in_box(c, {"pc4": [0, 1]})


def test_free_energy_of_a_gaussian_is_quadratic():
    """Images drawn from a 2D normal: -ln(p/p_max) = r²/2σ² (kT) where the bins are populated."""
    rng = np.random.default_rng(4)
    c = rng.normal(scale=[10.0, 5.0], size=(400_000, 2))
    fe = space.free_energy(c, (0, 1), bins=30, smooth=0)
    (cx, cy) = fe.centres
    x, y = np.meshgrid(cx, cy, indexing="ij")
    expected = x**2 / 200 + y**2 / 50
    expected -= expected[np.unravel_index(np.argmax(fe.counts), fe.counts.shape)]
    ok = fe.counts >= 200  # bins with a stable count
    assert ok.sum() > 100
    np.testing.assert_allclose(fe.energy[ok], expected[ok], atol=0.25)
    assert np.isnan(fe.energy[fe.counts == 0]).all() and np.nanmin(fe.energy) == 0
    smoothed = space.free_energy(c, (0, 1), bins=30)  # one bin of smoothing: a little wider
    np.testing.assert_allclose(smoothed.energy[ok], expected[ok], atol=0.5)
    assert space.free_energy(c[:100], (0, 1)).counts.shape == (8, 8)  # few images, few bins


def test_path_between_groups_follows_the_low_free_energy_valley():
    """Two wells joined by a half-ring: the straight line crosses empty space, the path does not."""
    rng = np.random.default_rng(5)
    phi = rng.uniform(0, np.pi, 20000)
    ring = np.stack([50 * np.cos(phi), 50 * np.sin(phi)], 1) + rng.normal(scale=3, size=(20000, 2))
    wells = np.concatenate([rng.normal([50, 0], 3, (5000, 2)), rng.normal([-50, 0], 3, (5000, 2))])
    c = np.concatenate([ring, wells])
    labels = np.full(len(c), -1)
    labels[len(ring) : len(ring) + 5000], labels[len(ring) + 5000 :] = 0, 1
    fe = space.free_energy(c, (0, 1), bins=40)
    path = space.group_path(c, labels, (0, 1), 25, "free_energy", fe)
    line = space.group_path(c, labels, (0, 1), 25, "line", fe)
    np.testing.assert_allclose(path[[0, -1]], line[[0, -1]])
    radius = np.linalg.norm(path, axis=1)
    assert np.abs(radius[1:-1] - 50).max() < 8  # along the ring
    assert np.abs(line[:, 1]).max() < 0.5 and np.linalg.norm(line[12]) < 5  # through the middle
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
    np.testing.assert_allclose(steps, steps.mean(), rtol=0.2)  # evenly spaced by arc length


def test_space_with_one_mode_draws_a_landscape_and_a_path(adk_model_files, tmp_path):
    """One mode: a single PC; the landscape is PC1 against zero and the path runs along PC1."""
    import pandas as pd

    from deephemnma.cli import main as cli
    from deephemnma.io import optics_table, write_star

    modes = dict(np.load(adk_model_files / "modes.npz"))
    for key in ("modes", "mode_numbers", "eigenvalues", "collectivity"):
        modes[key] = modes[key][:1]
    np.savez(tmp_path / "one.npz", **modes)
    rng = np.random.default_rng(6)
    amps = np.concatenate([rng.normal(-80, 5, 100), rng.normal(80, 5, 100)])
    parts = pd.DataFrame(
        {"rlnImageName": [f"{i + 1:06d}@s.mrcs" for i in range(200)], "rlnOpticsGroup": 1,
         "dhAmplitudeMode7": amps}
    )  # fmt: skip
    write_star(tmp_path / "in.star", optics_table(2.2, 64, 200, 2, 0.1), parts)
    args = ["space", "--particles", tmp_path / "in.star", "--modes", tmp_path / "one.npz"]
    args += ["--pdb", adk_model_files / "model.pdb", "--n-groups", 2, "--frames", 7]
    args += ["--path-groups", 0, 1, "--out-dir", tmp_path / "out"]
    assert cli([str(a) for a in args]) == 0
    fe = pd.read_csv(tmp_path / "out/free_energy.csv")
    assert set(fe["plane"]) == {"PC1/PC2"} and fe["images"].sum() == 200
    assert (tmp_path / "out/free_energy.png").exists()
    path = pd.read_csv(tmp_path / "out/trajectory_path.csv")
    assert list(path.columns) == ["frame", "PC1", "free_energy_kT"]
    assert path["PC1"].iloc[0] == pytest.approx(-80, abs=2) and path["PC1"].is_monotonic_increasing
    args[-4:-2], args[-1] = [0, 0], tmp_path / "out2"
    assert cli([str(a) for a in args]) == 2
    assert not (tmp_path / "out2").exists()  # refused before anything is written
