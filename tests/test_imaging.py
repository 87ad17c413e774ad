import math

import numpy as np
import pytest
import torch

from deephemnma import geometry, imaging


def relion_ctf_1d(s, defocus, voltage_kv, cs_mm, q):
    """RELION's CTF along one direction, written out: -sin(-pi l df s^2 + pi/2 Cs l^3 s^4 - K3)."""
    lam = imaging.electron_wavelength(voltage_kv)
    k3 = math.atan(q / math.sqrt(1 - q * q))
    return -np.sin(-math.pi * lam * defocus * s**2 + math.pi / 2 * cs_mm * 1e7 * lam**3 * s**4 - k3)


def test_one_atom_lands_at_expected_pixel():
    coords = torch.tensor([[10.0, -4.0, 6.0]], dtype=torch.float64)
    euler = torch.tensor([[30.0, 60.0, -20.0]], dtype=torch.float64)
    a = geometry.euler_to_matrix(euler)
    shift = torch.tensor([[2.0, -3.0]], dtype=torch.float64)
    px, box = 2.0, 48
    img = imaging.project(coords, a, shift, torch.ones(1, dtype=torch.float64), box, px, 3.0)[0]
    expected = (a[0] @ coords[0])[:2].numpy() / px + shift[0].numpy() + box // 2
    # centroid of the blob = expected (x, y); its integral = weight / pixel area (the footprint
    # cut at 4 sigma leaves out < 1e-4 of the atom)
    yy, xx = np.mgrid[:box, :box]
    im = img.numpy()
    centroid = np.array([(im * xx).sum(), (im * yy).sum()]) / im.sum()
    np.testing.assert_allclose(centroid, expected, atol=1e-4)
    assert im.sum() * px * px == pytest.approx(1.0, rel=1e-4)
    # a z displacement is invisible at tilt 0, psi 0, rot 0: projection along z
    ident = torch.eye(3, dtype=torch.float64)[None]
    zero = torch.zeros(1, 2, dtype=torch.float64)
    p1 = imaging.project(coords, ident, zero, torch.ones(1, dtype=torch.float64), box, px, 1.5)
    c2 = coords + torch.tensor([0.0, 0.0, 9.0], dtype=torch.float64)
    p2 = imaging.project(c2, ident, zero, torch.ones(1, dtype=torch.float64), box, px, 1.5)
    np.testing.assert_allclose(p1.numpy(), p2.numpy())


def test_projector_matches_the_untruncated_gaussian_sum():
    """The footprint splat equals the sum of every atom's full Gaussian over every pixel, written
    out in numpy; atoms near and beyond the edges included; gradients match finite differences."""
    rng = np.random.default_rng(3)
    box, px, sigma = 40, 1.3, 1.4
    coords = torch.tensor(rng.uniform(-30, 30, (2, 60, 3)))
    rot = geometry.euler_to_matrix(torch.tensor(rng.uniform(-180, 180, (2, 3))))
    shift = torch.tensor(rng.uniform(-3, 3, (2, 2)))
    w = torch.tensor(rng.uniform(0.5, 2.0, 60))
    got = imaging.project(coords, rot, shift, w, box, px, sigma).numpy()
    pos = np.einsum("bij,bnj->bni", rot.numpy()[:, :2], coords.numpy()) / px
    pos += shift.numpy()[:, None] + box // 2
    yy, xx = np.mgrid[:box, :box]
    d2 = (xx - pos[..., 0, None, None]) ** 2 + (yy - pos[..., 1, None, None]) ** 2
    g = np.exp(-d2 / (2 * (sigma / px) ** 2)) * w.numpy()[:, None, None]
    want = g.sum(1) / (2 * math.pi * sigma**2)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    c = coords[:1, :5].clone().requires_grad_(True)
    args = (rot[:1], shift[:1], w[:5], box, px, sigma)
    assert torch.autograd.gradcheck(lambda x: imaging.project(x, *args), (c,))
    empty = imaging.project(coords[:0], rot[:0], shift[:0], w, box, px, sigma)
    assert empty.shape == (0, box, box)


def test_projector_in_chunks_equals_one_call(monkeypatch):
    """Images and gradients do not depend on how the batch is cut (float32, per-image weights);
    an image with a NaN atom is NaN, the others are untouched."""
    rng = np.random.default_rng(4)
    coords = torch.tensor(rng.uniform(-20, 20, (5, 30, 3)), dtype=torch.float32)
    rot = geometry.euler_to_matrix(torch.tensor(rng.uniform(-180, 180, (5, 3)))).float()
    w = torch.tensor(rng.uniform(0.5, 2.0, (5, 30)), dtype=torch.float32)
    out = []
    for chunk in (2**20, 30 * 64):  # one call; two images per call
        monkeypatch.setattr(imaging, "CPU_CHUNK", chunk)
        c = coords.clone().requires_grad_(True)
        img = imaging.project(c, rot, torch.zeros(5, 2), w, 32, 1.5, 1.5)
        (img * torch.arange(32.0)).sum().backward()
        out.append((img.detach(), c.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.allclose(out[0][1], out[1][1])
    coords[2, 7, 0] = math.nan
    img = imaging.project(coords, rot, torch.zeros(5, 2), w, 32, 1.5, 1.5)
    assert torch.isnan(img[2]).all() and torch.equal(img[[0, 1, 3, 4]], out[0][0][[0, 1, 3, 4]])


def test_inplane_rotation_equals_rotating_the_projection():
    rng = np.random.default_rng(0)
    coords = torch.tensor(rng.normal(scale=8.0, size=(40, 3)))
    w = torch.ones(40, dtype=torch.float64)
    base = np.array([40.0, 70.0, 0.0])
    box, px = 64, 1.0
    p0 = imaging.project(
        coords,
        geometry.euler_to_matrix(torch.tensor(base))[None],
        torch.zeros(1, 2, dtype=torch.float64),
        w,
        box,
        px,
        1.5,
    )[0]
    p90 = imaging.project(
        coords,
        geometry.euler_to_matrix(torch.tensor(base + [0, 0, 90]))[None],
        torch.zeros(1, 2, dtype=torch.float64),
        w,
        box,
        px,
        1.5,
    )[0]
    # psi = +90: (x, y) -> (y, -x) in the image plane, i.e. the array rotated by 90 degrees
    # about the centre pixel D // 2 (exact on the grid for a square box with centre at D // 2)
    rotated = torch.zeros_like(p0)
    c = box // 2
    for y in range(1, box):
        for x in range(1, box):
            xs, ys = x - c, y - c  # new coords; old = (-ys, xs)
            ox, oy = -ys + c, xs + c
            if 0 <= ox < box and 0 <= oy < box:
                rotated[y, x] = p0[oy, ox]
    np.testing.assert_allclose(p90.numpy(), rotated.numpy(), atol=1e-9)


def test_ctf_matches_relion_formula_and_first_zero():
    box, px, df = 256, 1.0, 15000.0
    c = imaging.ctf(
        torch.tensor([df]), torch.tensor([df]), torch.tensor([0.0]), 300.0, 2.7, 0.1, px, box
    )[0]
    s = np.fft.rfftfreq(box, d=px)
    np.testing.assert_allclose(c[0].numpy(), relion_ctf_1d(s, df, 300.0, 2.7, 0.1), atol=2e-4)
    assert c[0, 0] == pytest.approx(0.1, abs=1e-5)  # amplitude contrast at s = 0, positive
    # first zero: pi lam df s^2 - pi/2 Cs lam^3 s^4 + K3 = pi (solve the quadratic in s^2)
    lam = imaging.electron_wavelength(300.0)
    k3 = math.atan(0.1 / math.sqrt(0.99))
    a, b, cc = -math.pi / 2 * 2.7e7 * lam**3, math.pi * lam * df, k3 - math.pi
    s2 = (-b + math.sqrt(b * b - 4 * a * cc)) / (2 * a)
    s0 = math.sqrt(s2)
    fine = np.linspace(0, 0.1, 20001)
    vals = relion_ctf_1d(fine, df, 300.0, 2.7, 0.1)
    first_zero = fine[np.argmax(vals < 0)]
    assert first_zero == pytest.approx(s0, abs=1e-5)
    i = int(s0 * box * px)
    assert c[0, i] > 0 > c[0, i + 1]  # sign change of our CTF between those samples


def test_ctf_astigmatism_angle_is_relion():
    """Full 2D grid against RELION: df(a) = (U+V)/2 + (U-V)/2 cos(2 (a - angle)), a from x."""
    box, px, du, dv, angle = 128, 1.0, 20000.0, 10000.0, 30.0
    c = imaging.ctf(
        torch.tensor([du]), torch.tensor([dv]), torch.tensor([angle]), 300.0, 2.7, 0.1, px, box
    )[0].numpy()
    ky = np.fft.fftfreq(box, d=px)[:, None]
    kx = np.fft.rfftfreq(box, d=px)[None, :]
    s = np.sqrt(kx**2 + ky**2)
    a = np.arctan2(ky, kx)
    df = (du + dv) / 2 + (du - dv) / 2 * np.cos(2 * (a - np.radians(angle)))
    lam = imaging.electron_wavelength(300.0)
    k3 = math.atan(0.1 / math.sqrt(0.99))
    expected = -np.sin(-math.pi * lam * df * s**2 + math.pi / 2 * 2.7e7 * lam**3 * s**4 - k3)
    low = s < 0.25  # compare where the CTF is sampled well
    np.testing.assert_allclose(c[low], expected[low], atol=5e-3)


def test_fourier_crop_keeps_band_limited_content():
    box = 64
    yy, xx = torch.meshgrid(
        torch.arange(box, dtype=torch.float64),
        torch.arange(box, dtype=torch.float64),
        indexing="ij",
    )
    img = 3.0 + torch.cos(2 * math.pi * 3 * xx / box) + torch.sin(2 * math.pi * 5 * yy / box)
    small = imaging.fourier_crop(img.double(), 32)
    yy2, xx2 = torch.meshgrid(
        torch.arange(32.0, dtype=torch.float64),
        torch.arange(32.0, dtype=torch.float64),
        indexing="ij",
    )
    expected = 3.0 + torch.cos(2 * math.pi * 3 * xx2 / 32) + torch.sin(2 * math.pi * 5 * yy2 / 32)
    np.testing.assert_allclose(small.numpy(), expected.numpy(), atol=1e-9)


@pytest.mark.parametrize("big,box", [(128, 64), (130, 64), (129, 64), (128, 63), (129, 63)])
def test_fourier_crop_equals_cutting_out_the_centred_spectrum(big, box):
    """The rfft-grid crop equals the crop of the full centred spectrum (numpy), Nyquist rows,
    columns and odd sizes included."""
    x = np.random.default_rng(big + box).normal(size=(2, big, big))
    f = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    lo = big // 2 - box // 2
    f = f[..., lo : lo + box, lo : lo + box]
    want = np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))).real * (box / big) ** 2
    got = imaging.fourier_crop(torch.from_numpy(x), box).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_noise_snr():
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    coords = torch.tensor(rng.normal(scale=10.0, size=(300, 3)), dtype=torch.float32)
    rot = geometry.euler_to_matrix(
        torch.tensor(geometry.random_euler(64, rng), dtype=torch.float32)
    )
    clean = imaging.project(coords, rot, torch.zeros(64, 2), torch.ones(300), 64, 1.5, 1.0)
    noisy = imaging.add_noise(clean, 0.1, gen)
    snr = clean.var(dim=(-2, -1)) / (noisy - clean).var(dim=(-2, -1))
    assert float(snr.mean()) == pytest.approx(0.1, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_projector_same_on_gpu():
    rng = np.random.default_rng(2)
    coords = torch.tensor(rng.normal(scale=10.0, size=(100, 3)), dtype=torch.float32)
    rot = geometry.euler_to_matrix(torch.tensor(geometry.random_euler(4, rng), dtype=torch.float32))
    args = (torch.zeros(4, 2), torch.ones(100), 48, 1.5, 1.0)
    cpu = imaging.project(coords, rot, *args)
    gpu = imaging.project(coords.cuda(), rot.cuda(), *(a.cuda() for a in args[:2]), *args[2:])
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-4)


def test_ctf_per_particle_bfactor():
    df = torch.tensor([10000.0, 10000.0])
    c = imaging.ctf(
        df, df, torch.zeros(2), 300.0, 2.7, 0.1, 1.5, 64, bfactor=torch.tensor([0.0, 80.0])
    )
    s2 = imaging.frequency_squared(64, 1.5)
    np.testing.assert_allclose(c[1].numpy(), (c[0] * torch.exp(-80.0 * s2 / 4)).numpy(), atol=1e-6)
