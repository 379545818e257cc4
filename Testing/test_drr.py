"""DRR physics and projectors: analytic ellipsoid, orientation, gradients, memory chunking, DiffDRR."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from DiffusionCore.errors import GeometryError, InputError
from DiffusionCore.xray.drr import (
    MU_WATER_PER_MM,
    Attenuation,
    DRRGeometry,
    beer_lambert,
    detector_rays,
    drr_from_hu,
    hu_to_mu,
    project_parallel_axis,
    radiograph_style,
    render_drr,
)

SHAPE = (40, 40, 40)  # (D, H, W)
SPACING = (2.0, 1.5, 1.25)  # (z, y, x) mm
SEMI = (20.0, 24.0, 30.0)  # ellipsoid semi-axes (x, y, z) mm
MU0 = 0.02


def _ellipsoid(supersample: int = 4) -> torch.Tensor:
    """Partial-volume ellipsoid of attenuation MU0, (1, 1, D, H, W)."""
    axes = []
    for n, s in zip(SHAPE, SPACING):
        sub = (torch.arange(n * supersample, dtype=torch.float64) + 0.5) / supersample - n / 2
        axes.append(sub * s)
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    inside = ((xx / SEMI[0]) ** 2 + (yy / SEMI[1]) ** 2 + (zz / SEMI[2]) ** 2 <= 1).double()
    k = supersample
    occ = inside.reshape(SHAPE[0], k, SHAPE[1], k, SHAPE[2], k).mean(dim=(1, 3, 5))
    return (occ * MU0).float()[None, None]


def _analytic(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Chord length x MU0 of rays through the ellipsoid (quadratic intersection)."""
    r = torch.tensor(SEMI, dtype=torch.float64)
    o, d = origins / r, dirs / r
    a = (d * d).sum(-1)
    b = 2 * (o * d).sum(-1)
    c = (o * o).sum(-1) - 1
    disc = (b * b - 4 * a * c).clamp_min(0)
    chord = torch.sqrt(disc) / a * dirs.norm(dim=-1)
    return chord * MU0


def _check_against_analytic(geometry: DRRGeometry) -> None:
    mu = _ellipsoid()
    drr = render_drr(mu, SPACING, geometry)[0, 0].double()
    ref = _analytic(*detector_rays(geometry))
    inner = ref > 0.3 * ref.max()
    rel = ((drr - ref).abs()[inner] / ref[inner]).mean().item()
    assert rel < 0.02, f"mean relative error {rel:.4f} inside the ellipsoid shadow"
    assert abs(drr.max().item() - ref.max().item()) / ref.max().item() < 0.02
    # outside the shadow only partial-volume blur at the rim remains
    assert drr[ref == 0].sum().item() < 0.03 * drr.sum().item()


def test_parallel_beam_matches_ellipsoid_chords():
    geom = DRRGeometry(view="pa", detector_shape=(48, 40), pixel_spacing=(2.0, 1.5))
    _check_against_analytic(geom)


def test_cone_beam_matches_ellipsoid_chords_with_magnification():
    geom = DRRGeometry(
        view="lateral",
        projection="cone",
        sdd=400.0,
        sid=250.0,
        detector_shape=(56, 48),
        pixel_spacing=(2.5, 2.0),
    )
    _check_against_analytic(geom)
    # the shadow is magnified by sdd/sid: its height on the detector ~ 2 * SEMI_z * 1.6
    drr = render_drr(_ellipsoid(), SPACING, geom)[0, 0]
    rows = (drr.amax(dim=1) > 1e-3).sum().item() * 2.5
    assert abs(rows - 2 * SEMI[2] * 400 / 250) < 3 * 2.5


def test_fast_axis_projector_equals_ray_marcher():
    mu = _ellipsoid() * (1 + torch.rand(1, 1, *SHAPE))
    for view in ("pa", "lateral"):
        fast = project_parallel_axis(mu, SPACING, view)
        geom = DRRGeometry(view=view).with_detector_for(SHAPE, SPACING)
        marched = render_drr(mu, SPACING, geom)
        assert fast.shape == marched.shape
        torch.testing.assert_close(fast, marched, atol=2e-3, rtol=2e-3)


def test_orientation_pa_and_lateral():
    """A dense block at the patient's left, superior, anterior shows where a reader expects it."""
    vol = torch.zeros(1, 1, *SHAPE)
    vol[0, 0, 30:, 5:12, 30:] = 0.05  # z high = superior, y low = anterior, x high = patient left
    pa = project_parallel_axis(vol, SPACING, "pa")[0, 0]
    lat = project_parallel_axis(vol, SPACING, "lateral")[0, 0]
    assert pa[:10, 30:].mean() > 0 and pa[20:, :].abs().sum() == 0  # top rows, right columns (patient left)
    assert lat[:10, 5:12].mean() > 0 and lat[:, 20:].abs().sum() == 0  # top rows, left columns (anterior)
    geom = DRRGeometry(view="pa", projection="cone", sdd=500, sid=300).with_detector_for(SHAPE, SPACING)
    cone = render_drr(vol, SPACING, geom)[0, 0]
    assert cone[:15, 25:].sum() > 0.9 * cone.sum()


def test_hu_to_mu_physics():
    hu = torch.tensor([-1000.0, -2000.0, 0.0, 1000.0])
    mu = hu_to_mu(hu)
    assert mu[0] == 0 and mu[1] == 0
    assert math.isclose(mu[2].item(), MU_WATER_PER_MM, rel_tol=1e-6)
    assert math.isclose(mu[3].item(), 2 * MU_WATER_PER_MM, rel_tol=1e-6)
    harder = hu_to_mu(hu, Attenuation(bone_scale=2.0))
    assert harder[3] > mu[3] and harder[2] == mu[2]
    # 20 cm of water transmits exp(-3.86) ~ 2 %
    water = torch.zeros(1, 1, 4, 200, 4)
    trans = beer_lambert(drr_from_hu(water, (1.0, 1.0, 1.0)))
    assert torch.allclose(trans, torch.full_like(trans, math.exp(-200 * MU_WATER_PER_MM)), rtol=1e-4)


def test_gradients_reach_the_volume_and_batches_are_independent():
    mu = (_ellipsoid().repeat(2, 1, 1, 1, 1) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1)).requires_grad_()
    geom = DRRGeometry(
        view="pa", projection="cone", sdd=400, sid=250, detector_shape=(16, 16), pixel_spacing=(5.0, 5.0)
    )
    out = render_drr(mu, SPACING, geom, max_samples_per_chunk=5000)  # many chunks, recomputed in backward
    torch.testing.assert_close(out[1], 2 * out[0], rtol=1e-4, atol=1e-6)
    out[0].sum().backward()
    g = mu.grad
    assert g is not None and g[0].abs().sum() > 0 and g[1].abs().sum() == 0
    # chunked result equals the one-chunk result
    whole = render_drr(mu.detach(), SPACING, geom, max_samples_per_chunk=10**9)
    torch.testing.assert_close(out.detach(), whole)
    fast = _ellipsoid().requires_grad_()
    project_parallel_axis(fast, SPACING, "lateral").sum().backward()
    assert torch.allclose(fast.grad, torch.full_like(fast.grad, SPACING[2]))


def test_radiograph_style_range_and_errors():
    line = torch.rand(2, 1, 8, 8) * 5
    style = radiograph_style(line)
    assert style.min() >= 0 and style.max() <= 1 and style.shape == line.shape
    with pytest.raises(InputError):
        render_drr(torch.zeros(4, 4, 4), SPACING, DRRGeometry())
    with pytest.raises(GeometryError):
        DRRGeometry(projection="cone", sdd=500, sid=600)
    with pytest.raises(InputError):
        DRRGeometry(view="oblique")


@pytest.mark.skipif(importlib.util.find_spec("diffdrr") is None, reason="diffdrr is not installed")
def test_agrees_with_diffdrr_on_a_random_phantom():
    """Cone-beam PA DRR vs DiffDRR's Siddon renderer on the same density volume (NCC > 0.98)."""
    import torchio
    from diffdrr.data import read
    from diffdrr.drr import DRR

    rng = np.random.default_rng(0)
    density = np.zeros((32, 32, 32), np.float32)
    density[8:24, 6:26, 10:22] = 1.0
    density += 0.3 * rng.random(density.shape).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = torchio.ScalarImage(tensor=torch.from_numpy(density)[None], affine=affine)
    subject = read(image, orientation="PA")
    subject.density = torchio.ScalarImage(
        tensor=torch.from_numpy(density)[None], affine=subject.volume.affine
    )
    drr = DRR(subject, sdd=600.0, height=32, delx=3.0)
    theirs = drr(
        torch.zeros(1, 3),
        torch.tensor([[0.0, 400.0, 0.0]]),
        parameterization="euler_angles",
        convention="ZXY",
    )[0, 0]
    # our volume: array (z, y, x) = numpy transpose of the (x, y, z) NIfTI-like tensor
    mu = torch.from_numpy(density.transpose(2, 1, 0).copy())[None, None]
    ours = render_drr(
        mu,
        (2.0, 2.0, 2.0),
        DRRGeometry(
            view="pa",
            projection="cone",
            sdd=600.0,
            sid=400.0,
            detector_shape=(32, 32),
            pixel_spacing=(3.0, 3.0),
        ),
    )[0, 0]
    best = max(_ncc(ours, t) for t in _dihedral(theirs))
    assert best > 0.98


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a = (a - a.mean()) / (a.std() + 1e-12)
    b = (b - b.mean()) / (b.std() + 1e-12)
    return float((a * b).mean())


def _dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in (img, img.T):
        out += [t, t.flip(0), t.flip(1), t.flip(0).flip(1)]
    return out
