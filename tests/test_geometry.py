import numpy as np
import pytest
import torch

from deephemnma import geometry as g


def relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out independently (Rz(psi) Ry(tilt) Rz(rot), passive)."""

    def rz(a):
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    return rz(psi) @ ry(tilt) @ rz(rot)


def test_euler_matrix_matches_relion_formula():
    rng = np.random.default_rng(0)
    eul = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    mats = g.euler_to_matrix(eul)
    for e, m in zip(eul, mats, strict=True):
        np.testing.assert_allclose(m, relion_matrix(*e), atol=1e-12)
    # a known case: tilt 90 maps the model z axis onto image -x
    m = g.euler_to_matrix(np.array([0.0, 90.0, 0.0]))
    np.testing.assert_allclose(m @ [0, 0, 1], [-1, 0, 0], atol=1e-12)


def test_round_trips_and_quaternion_matrix_agree():
    rng = np.random.default_rng(1)
    q = g.random_quaternions(200, rng)
    eul = g.quaternion_to_euler(q)
    assert np.all((eul[:, 1] >= 0) & (eul[:, 1] <= 180))
    np.testing.assert_allclose(g.euler_to_quaternion(eul), q, atol=1e-9)
    np.testing.assert_allclose(g.euler_to_matrix(eul), g.quaternion_to_matrix(q), atol=1e-9)
    np.testing.assert_allclose(g.matrix_to_euler(g.euler_to_matrix(eul)), eul, atol=1e-7)


def test_seed_quaternion_formula():
    phi, theta, psi = 30.0, 50.0, -70.0
    h = np.radians([phi, theta, psi]) / 2
    expected = np.array(
        [
            np.cos(h[1]) * np.cos(h[2] + h[0]),
            -np.sin(h[1]) * np.sin(h[2] - h[0]),
            np.sin(h[1]) * np.cos(h[2] - h[0]),
            np.cos(h[1]) * np.sin(h[2] + h[0]),
        ]
    )
    np.testing.assert_allclose(g.euler_to_quaternion(np.array([phi, theta, psi])), expected)


def test_distance_sign_invariant_and_equals_matrix_angle():
    rng = np.random.default_rng(2)
    q1, q2 = g.random_quaternions(100, rng), g.random_quaternions(100, rng)
    np.testing.assert_allclose(g.quaternion_distance_deg(q1, -q1), 0.0, atol=1e-5)
    a1, a2 = g.quaternion_to_matrix(q1), g.quaternion_to_matrix(q2)
    rel = np.einsum("nji,njk->nik", a1, a2)
    angle = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    np.testing.assert_allclose(g.quaternion_distance_deg(q1, q2), angle, atol=1e-5)
    # a pure psi change of 25 degrees is a 25-degree rotation
    d = g.euler_distance_deg(np.array([10.0, 40.0, 5.0]), np.array([10.0, 40.0, 30.0]))
    assert d == pytest.approx(25.0)


def test_gimbal_lock_and_torch():
    e = np.array([[30.0, 0.0, 20.0], [30.0, 180.0, 20.0]])
    back = g.matrix_to_euler(g.euler_to_matrix(e))
    np.testing.assert_allclose(g.euler_to_matrix(back), g.euler_to_matrix(e), atol=1e-9)
    et = torch.tensor(e, dtype=torch.float64)
    np.testing.assert_allclose(g.euler_to_matrix(et).numpy(), g.euler_to_matrix(e))
    qt = g.euler_to_quaternion(et)
    np.testing.assert_allclose(qt.numpy(), g.euler_to_quaternion(e))
    assert float(g.quaternion_distance_deg(qt, -qt).max()) < 1e-3


def test_random_orientations_are_uniform():
    q = g.random_quaternions(20000, np.random.default_rng(3))
    view = g.quaternion_to_matrix(q)[:, 2, :]  # projection direction
    assert abs(view[:, 2].mean()) < 0.02  # uniform cos(tilt) has mean 0 and variance 1/3
    assert view[:, 2].var() == pytest.approx(1 / 3, abs=0.01)
