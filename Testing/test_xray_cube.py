"""Training and evaluation cubes: the body is centred front-to-back, whatever the table height of the scan."""

from __future__ import annotations

import numpy as np
from conftest import ct_phantom_array

from DiffusionCore.metrics import body_mask
from DiffusionCore.volume import AIR_HU, Volume
from DiffusionCore.xray.data import body_ap_offset, ct_to_cube


def scan_with_body_at(shift_rows: int, table: bool = True) -> Volume:
    """A phantom chest inside a wider field of view, moved ``shift_rows`` rows posterior (array axis 1 is LPS y,
    anterior to posterior), on a table plate behind it; 4 mm slices, 2 mm pixels."""
    body = ct_phantom_array((20, 48, 64))
    arr = np.full((20, 112, 64), AIR_HU, dtype=np.float32)
    arr[:, 32 + shift_rows : 80 + shift_rows] = body
    if table:
        arr[:, 84 + shift_rows : 86 + shift_rows] = 200.0  # a plate apart from the body
    return Volume(arr, spacing=(2.0, 2.0, 4.0), origin=(-64.0, -112.0, -40.0))


def test_cubes_are_centred_on_the_body_front_to_back_and_forget_the_table_height():
    low, high = scan_with_body_at(-20), scan_with_body_at(20)
    for vol, shift_mm in ((low, -40.0), (high, 40.0)):
        plain = ct_to_cube(vol, 32, 240.0, body_centred=False)
        assert abs(body_ap_offset(plain) - shift_mm) <= 7.5  # the scan's centre is not the body's
        cube = ct_to_cube(vol, 32, 240.0)
        assert abs(body_ap_offset(cube)) <= 7.5  # within one cube voxel
        rows = np.flatnonzero(body_mask(cube.array).any(axis=(0, 2)))
        assert rows[0] > 0 and rows[-1] < 31  # the whole body front-to-back is inside
        # left-right and head-foot stay where the radiograph shows them
        assert cube.origin[0] == plain.origin[0] and cube.origin[2] == plain.origin[2]
    # the same body at two table heights gives the same cube: the training data no longer holds an offset
    # that no radiograph decides
    a, b = ct_to_cube(low, 32, 240.0).array, ct_to_cube(high, 32, 240.0).array
    body = body_mask(a) | body_mask(b)
    assert np.abs(a - b)[body].mean() < 60.0
    assert np.abs(ct_to_cube(low, 32, 240.0, body_centred=False).array - ct_to_cube(high, 32, 240.0,
                                                                                    body_centred=False).array)[body].mean() > 150.0  # fmt: skip


def test_a_cube_without_a_body_stays_on_the_scans_centre():
    air = Volume(np.full((8, 32, 32), AIR_HU, dtype=np.float32), spacing=(2.0, 2.0, 4.0))
    np.testing.assert_allclose(ct_to_cube(air, 16, 100.0).origin, ct_to_cube(air, 16, 100.0, body_centred=False).origin)


def test_a_reference_ct_is_scored_on_its_body_centred_cube_whatever_its_position_and_size():
    """The X-ray module's reference CT (XrayToCTGenerate --referenceVolume): a generated cube is centred on the body of
    its radiograph, at the origin; the reference is scored on its own body-centred cube of that size and field of
    view, as evaluate-xray scores. The old measure put the cube into the reference's patient coordinates (a scan
    tens of centimetres from the origin compared air with air) and failed on a reference thinner than the SSIM
    window (10 slices: an internal error)."""
    from DiffusionCore.xray.evaluate import reference_scores

    scan = scan_with_body_at(10)
    far = Volume(scan.array, scan.spacing, (-64.0, -112.0, -640.0))  # the same scan 60 cm down the table
    thin = Volume(scan.array[::2], (2.0, 2.0, 8.0), scan.origin)  # 10 slices
    for reference in (scan, far, thin):
        cube = ct_to_cube(reference, 32, 240.0)
        generated = Volume(cube.array, cube.spacing, (-(32 - 1) / 2 * 7.5,) * 3)  # at the origin, as generated
        own = reference_scores(generated, reference)
        assert own["psnr"] > 60.0 and own["ssim"] > 0.999
        blank = Volume(np.full_like(cube.array, AIR_HU), cube.spacing, generated.origin)
        worse = reference_scores(blank, reference)
        assert worse["psnr"] < own["psnr"] - 30.0 and worse["ssim"] < 0.9
