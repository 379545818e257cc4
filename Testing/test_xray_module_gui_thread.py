"""What the X-ray to CT module does in Slicer's GUI thread: Apply hands a colour radiograph over without making it
grey there (the job's process does, with its progress bar and Cancel), and the reference CT's voxels are read once
per change of the node, not on every refresh of the panel.

Real MRML nodes (slicer-core), the panel on the Qt stand-in of test_slicer_widgets, the tiny test model and a real
worker process.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

import XrayToCTLib.xray_logic as xray_logic  # noqa: E402
from CTDiffusionSRLib import mrml_io  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct, phantom_radiograph  # noqa: E402
from test_slicer_widgets import _open, _until_idle, panels, widgets  # noqa: E402, F401  (the Qt stand-in's fixtures)
from XrayToCTLib import XrayJob, XraySettings, check_xray_input, write_radiograph  # noqa: E402
from XrayToCTLib.xray_logic import check_reference_input  # noqa: E402

import DiffusionCore.volume  # noqa: E402
import DiffusionCore.xray.radiograph as radiograph  # noqa: E402
from DiffusionCore.xray.radiograph import read_radiograph  # noqa: E402

ONE_STAGE = XraySettings(num_stages=1, steps=1, device="cpu", tiny_test_model=True)
#: IJK-to-RAS directions (row by row) of a 2D image as Slicer loads an image file: LPS identity, shown as stored
SHOWN_AS_STORED = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
#: ... and of one stored transposed (its columns run from anterior to posterior, its rows from right to left)
STORED_TRANSPOSED = (0, -1, 0, -1, 0, 0, 0, 0, 1)


def _grey(shape=(64, 64)) -> np.ndarray:
    """A uint8 chest radiograph of ``shape`` (rows, columns)."""
    side = max(shape)
    return (phantom_radiograph(side)[: shape[0], : shape[1]] * 250).astype(np.uint8)


def _node(scene, pixels: np.ndarray, name: str, directions=SHOWN_AS_STORED, spacing=(5.0, 5.0, 1.0)):
    """A single-slice volume node of ``pixels`` ((H, W) scalar, or (H, W, C) as a vector node: a PNG saved in RGB)."""
    import vtk
    from vtk.util import numpy_support

    vector = pixels.ndim == 3
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(pixels.shape[1], pixels.shape[0], 1)
    flat = np.ascontiguousarray(pixels).reshape(pixels.shape[0] * pixels.shape[1], -1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat if vector else flat.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASDirections(*directions)
    node.SetSpacing(*spacing)
    node.CreateDefaultDisplayNodes()
    return node


def _in_colour(grey: np.ndarray, channels: int = 3) -> np.ndarray:
    """``grey`` saved in colour: RGB, or RGBA with an opaque alpha (a screenshot)."""
    planes = [grey] * 3 + ([np.full_like(grey, 255)] if channels == 4 else [])
    return np.stack(planes, axis=-1)


def _record_conversions(monkeypatch) -> list[int]:
    """The threads (idents) greyscale_pixels runs in, in this process, from now on."""
    threads: list[int] = []
    convert = radiograph.greyscale_pixels

    def recorded(*args, **kwargs):
        threads.append(threading.get_ident())
        return convert(*args, **kwargs)

    monkeypatch.setattr(radiograph, "greyscale_pixels", recorded)
    return threads


# -- a colour radiograph: made grey by the job, not in the GUI thread ------------------------------------------------
def test_apply_does_not_make_a_colour_radiograph_grey_in_the_gui_thread(panels, scene, monkeypatch):  # noqa: F811
    """Apply made an RGB radiograph grey in Slicer's GUI thread (write_radiograph, before the job started): Slicer froze
    for a 4000x5000 image with no progress bar and no Cancel. The check at selection still reads it once; Apply does
    not again, and the job's process makes it grey."""
    panel, p, ui = _open(panels.xray.XrayWidget)
    monkeypatch.setattr(panel.logic, "settingsFrom", lambda p: ONE_STAGE)  # the tiny model: seconds
    node = _node(scene, _in_colour(_grey()), "chest PA (RGB)")
    p.inputRadiograph = node  # checked here, once: real colour is refused before Apply
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    threads = _record_conversions(monkeypatch)
    gui_thread = threading.get_ident()
    ui.applyButton.emit("clicked(bool)", True)
    assert panel.monitor.running and ui.applyButton.text == "Cancel"  # the job runs, with its bar and Cancel
    assert gui_thread not in threads, "the radiograph was made grey in the GUI thread before the job started"
    _until_idle(panel)
    assert panels.dialogs.errors == [] and ui.statusLabel.text.startswith("Done in "), ui.statusLabel.text
    assert p.resultVolume is not None and p.resultVolume.GetName() == "chest PA (RGB) CT (synthetic)"
    assert gui_thread not in threads
    panel.cleanup()


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("directions", [SHOWN_AS_STORED, STORED_TRANSPOSED], ids=["as-stored", "transposed"])
def test_a_colour_radiograph_reaches_the_command_as_its_greyscale_twin_does(scene, tmp_path, channels, directions):
    """The colour channels go over as stored (one vector pixel each, in their own type), turned as Slicer shows the
    node; the command's reader makes them grey: what it reads is the greyscale radiograph's pixels and spacing."""
    import SimpleITK as sitk

    grey = _grey((64, 48))
    spacing = (0.3, 0.4, 1.0)
    colour = _node(scene, _in_colour(grey, channels), "colour", directions, spacing)
    twin = _node(scene, grey, "grey", directions, spacing)
    assert check_xray_input(colour) == "" and check_xray_input(twin) == ""
    handed = write_radiograph(colour, tmp_path / "colour.mha")
    image = sitk.ReadImage(str(handed))
    assert image.GetNumberOfComponentsPerPixel() == channels and image.GetPixelID() == sitk.sitkVectorUInt8
    read, expected = read_radiograph(handed), read_radiograph(write_radiograph(twin, tmp_path / "grey.mha"))
    assert read.array.shape == expected.array.shape == ((48, 64) if directions == STORED_TRANSPOSED else (64, 48))
    np.testing.assert_array_equal(read.array, expected.array)
    assert read.pixel_spacing == expected.pixel_spacing
    # as stored (a node loaded from DICOM, whose header the command applies): not turned
    read = read_radiograph(write_radiograph(colour, tmp_path / "colour.mha", as_displayed=False))
    expected = read_radiograph(write_radiograph(twin, tmp_path / "grey.mha", as_displayed=False))
    assert read.array.shape == (64, 48) and read.pixel_spacing == expected.pixel_spacing
    np.testing.assert_array_equal(read.array, expected.array)
    job = XrayJob(scene, colour, ONE_STAGE)  # the temp-disk check counts the channels (RGBA: 4 bytes a pixel)
    assert job.hand_off_bytes() - XrayJob(scene, twin, ONE_STAGE).hand_off_bytes() == grey.size * (channels - 1)


def test_a_colour_radiograph_that_is_real_colour_is_still_refused_before_apply(scene, tmp_path):
    """Refused in the panel in the same words as before; handed over directly, the command refuses it too."""
    from DiffusionCore.errors import InputError

    rgb = _in_colour(_grey())
    rgb[..., 0] = 255 - rgb[..., 0]  # a colour-mapped picture
    node = _node(scene, rgb, "photo")
    said = check_xray_input(node)
    assert said.startswith("'photo' is a colour image (its red, green and blue differ); a radiograph is greyscale.")
    with pytest.raises(InputError, match="is a colour image"):
        XrayJob(scene, node, ONE_STAGE)
    with pytest.raises(InputError, match="is a colour image"):
        read_radiograph(write_radiograph(node, tmp_path / "photo.mha"))


# -- the reference CT: its voxels read once per change of the node --------------------------------------------------
def _reference_ct(scene, name: str = "ref"):
    return mrml_io.add_volume_node(scene, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)), name)


def _voxels(node) -> np.ndarray:
    """The node's own voxels (a view: writing to it edits the node, as slicer.util.arrayFromVolume does)."""
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())


def _record_voxel_reads(monkeypatch) -> list[str]:
    """The volumes (by their names in the message) whose voxels check_ct reads, from now on."""
    reads: list[str] = []
    check_ct = DiffusionCore.volume.check_ct

    def recorded(arr, source: str = "volume") -> list[str]:
        reads.append(source)
        return check_ct(arr, source)

    monkeypatch.setattr(DiffusionCore.volume, "check_ct", recorded)
    return reads


def test_the_reference_ct_is_read_once_per_change_of_the_node(panels, scene, monkeypatch):  # noqa: F811
    """Every refresh of the panel (each change of a setting) read the whole reference CT again for its HU range:
    0.1-0.2 s and a 157 MB temporary for a 512x512x600 CT, several times per click."""
    reads = _record_voxel_reads(monkeypatch)
    panel, p, ui = _open(panels.xray.XrayWidget)
    p.inputRadiograph = _node(scene, _grey(), "chest PA")
    reference = _reference_ct(scene)
    p.referenceVolume = reference
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    assert reads == ["Reference CT 'ref'"]
    p.seed, p.steps, p.numStages, p.view = 7, 3, 1, "pa"  # settings that do not touch the reference
    assert check_reference_input(reference) == ""
    XrayJob(scene, p.inputRadiograph, ONE_STAGE, reference_node=reference)  # Apply's own check: the same verdict
    assert reads == ["Reference CT 'ref'"]
    panel.cleanup()

    # its voxels edited (as slicer.util.arrayFromVolumeModified says it), renamed, replaced: read again
    voxels = _voxels(reference)
    voxels[...] = np.clip(voxels, 0, None) / 1000.0  # now in [0, ~2]: not CT in Hounsfield units
    reference.GetImageData().GetPointData().GetScalars().Modified()
    said = check_reference_input(reference)
    assert said.startswith("Reference CT 'ref' does not look like CT in Hounsfield units"), said
    assert said.endswith("The reference scores need a CT in Hounsfield units: choose the CT this radiograph shows, "
                         "or no reference.")  # fmt: skip
    assert len(reads) == 2 and check_reference_input(reference) == said and len(reads) == 2
    reference.SetName("MR")
    assert check_reference_input(reference).startswith("Reference CT 'MR' does not look like CT") and len(reads) == 3
    mrml_io.set_node_from_volume(reference, phantom_ct(shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0)))
    assert check_reference_input(reference) == "" and len(reads) == 4
    assert check_reference_input(reference) == "" and len(reads) == 4


def test_each_reference_ct_keeps_its_own_verdict(scene, monkeypatch):
    """Two CTs chosen in turn: each read once, and each keeps its verdict (one is not taken for the other)."""
    reads = _record_voxel_reads(monkeypatch)
    ct, flat = _reference_ct(scene, "CT"), _reference_ct(scene, "flat")
    _voxels(flat)[...] = 40.0
    flat.GetImageData().Modified()
    for _ in range(3):
        assert check_reference_input(ct) == ""
        assert check_reference_input(flat).startswith("Reference CT 'flat' is constant (40 everywhere)")
    assert reads == ["Reference CT 'CT'", "Reference CT 'flat'"]
    assert xray_logic._reference_verdicts  # kept per node ID, the most recent VERDICTS_KEPT of them


def test_a_colour_hand_off_is_budgeted_by_its_bytes_not_sixteen_per_channel(tmp_path, monkeypatch):
    """The module now hands a colour-encoded radiograph over as its 8-bit channels; the reader's memory check before
    decoding counts those bytes plus the work on the grey image, so such a file is read where its float32 grey twin
    would be (a check of 16 bytes per channel asked 4 times the memory of the grey image's for RGBA)."""
    import SimpleITK as sitk

    grey = (np.arange(2000 * 1500, dtype=np.uint32).reshape(2000, 1500) % 251).astype(np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    path = tmp_path / "rgba.mha"
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(path))
    pixels = grey.size
    # room for the 4 channels and the grey image's work, not for 16 bytes per channel
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", str(pixels * (radiograph.READ_BYTES_PER_PIXEL + 4) + 1))
    assert read_radiograph(path).array.shape == grey.shape
    monkeypatch.setenv("DIFFUSIONCORE_MEMORY_LIMIT", str(pixels * (radiograph.READ_BYTES_PER_PIXEL + 4) - 1))
    with pytest.raises(Exception, match=r"not enough memory: decoding rgba\.mha \(1500x2000 pixels\)"):
        read_radiograph(path)
