"""Every result names the very scan (or radiograph) it was made from: ``input_sha256``, the digest of the input's
voxels and grid as read, in the run's report and in the result's provenance (NRRD / MetaImage header, NIfTI sidecar,
DICOM DerivationDescription), the same whatever file or format held the input."""

from __future__ import annotations

import numpy as np
import pytest

from DiffusionCore import Volume, degrade, read_volume, save_result, write_volume
from DiffusionCore.provenance import read_provenance


def _ct(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = np.full((16, 32, 32), -1000.0, np.float32)
    arr[:, 8:24, 8:24] = 40.0
    arr += rng.normal(0.0, 5.0, arr.shape).astype(np.float32)
    return Volume(arr, (0.75, 0.75, 1.0), (-12.0, -12.0, 0.0), np.eye(3), {"source": "phantom.nrrd"})


def test_the_digest_is_the_contents_not_the_file():
    thick = degrade(_ct(), 4, "z")
    digest = thick.content_sha256()
    assert len(digest) == 64 and digest == degrade(_ct(), 4, "z").content_sha256()
    changed = thick.array.copy()
    changed[0, 0, 0] += 1.0
    assert Volume(changed, thick.spacing, thick.origin, thick.direction).content_sha256() != digest
    moved = (thick.origin[0] + 0.5, *thick.origin[1:])
    assert Volume(thick.array, thick.spacing, moved, thick.direction).content_sha256() != digest


def test_the_same_scan_in_two_formats_has_one_digest(tmp_path):
    thick = degrade(_ct(), 4, "z")
    a = read_volume(write_volume(thick, tmp_path / "ct.nrrd", dtype="float32"))
    b = read_volume(write_volume(thick, tmp_path / "ct.nii.gz", dtype="float32"))
    assert a.content_sha256() == b.content_sha256()


@pytest.fixture(scope="module")
def sr_result():
    from DiffusionCore.sr.pipeline import SuperResolver

    thick = degrade(_ct(), 4, "z")
    out, report = SuperResolver.tiny_predictor().run(thick, factor=4, axis="z", device="cpu")
    return thick, out, report


@pytest.mark.parametrize("name", ["out.nrrd", "out.nii.gz", "out.mha", "series"])
def test_an_sr_result_records_its_inputs_digest_in_every_format(tmp_path, sr_result, name):
    thick, out, report = sr_result
    assert report["input_sha256"] == thick.content_sha256()
    if name == "series":  # a DICOM series, as sr --output-format dicom writes it
        from DiffusionCore.results import result_provenance, write_result

        write_result(out, tmp_path / name, result_provenance(out, report, input=thick), as_dicom=True)
        first = sorted((tmp_path / name).iterdir())[0]
    else:
        first = save_result(out, tmp_path / name, report, input=thick)[0]
    assert read_provenance(first).input_sha256 == thick.content_sha256()


def test_an_xray_result_records_the_radiographs_digest(tmp_path):
    from DiffusionCore.xray.pipeline import XrayToCTGenerator
    from DiffusionCore.xray.radiograph import Radiograph

    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    ct, report = XrayToCTGenerator.tiny().run(image, num_stages=1, device="cpu", seed=0)
    assert report["input_sha256"] == Radiograph(image).content_sha256()
    written = save_result(ct, tmp_path / "ct.nii.gz", report, input="chest.png")
    assert read_provenance(written[0]).input_sha256 == report["input_sha256"]
    other = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    assert Radiograph(other).content_sha256() != report["input_sha256"]
