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
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    g0 = starfile.read(tmp_path / "out/group_0.star")["particles"]
    assert len(g0) == n // 2 and (g0["dhAmplitudeMode7"] < 0).all()  # lower PC1 first
    groups = pd.read_csv(tmp_path / "out/groups.csv")
    assert groups["centroid_mode7"].tolist() == pytest.approx([-100, 100], abs=2)
    traj = read_structure(tmp_path / "out/trajectory_pc1.pdb")
    assert traj.numCoordsets() == 5
    # the trajectory spans ±2 std along PC1, i.e. about ±2 * 112 in amplitude (mostly mode 7)
    disp = np.sqrt(((traj.getCoordsets()[-1] - traj.getCoordsets()[0]) ** 2).sum(1).mean())
    assert 2.0 < disp < 20.0
