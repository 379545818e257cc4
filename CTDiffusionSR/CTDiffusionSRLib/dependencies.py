"""Which Python packages DiffusionCore needs inside Slicer, and how to install them without harm.

torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the GPU driver.
The other packages are installed with ``--no-deps`` so that pip never replaces Slicer's own numpy,
SimpleITK or VTK (a replaced numpy breaks Slicer until it is reinstalled).
"""

from __future__ import annotations

import importlib.util

#: import name -> pip requirement, for what Slicer does not ship.
REQUIREMENTS = {
    "einops": "einops>=0.7",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.60",
    "nibabel": "nibabel>=5.0",
    "scipy": "scipy>=1.10",
    "yaml": "pyyaml>=6",
}
#: Also needed for the training panel.
TRAINING_REQUIREMENTS = {"tensorboard": "tensorboard>=2.14"}
#: Packages Slicer provides; never installed or upgraded by this extension.
PROTECTED = ("numpy", "simpleitk", "vtk", "torch", "qt", "ctk")

TORCH_MISSING_MESSAGE = (
    "PyTorch is not installed in Slicer. Install the 'PyTorch' extension from the Extensions Manager, "
    "restart Slicer, then open this module again: it installs the torch build that fits your GPU."
)


def is_installed(import_name: str) -> bool:
    return importlib.util.find_spec(import_name) is not None


def missing_requirements(training: bool = False) -> list[str]:
    """pip requirements of the packages that cannot be imported (torch excluded: see PyTorchUtils)."""
    wanted = dict(REQUIREMENTS)
    if training:
        wanted.update(TRAINING_REQUIREMENTS)
    return [req for name, req in wanted.items() if not is_installed(name)]


def pip_install_arguments(requirements: list[str]) -> str:
    """The argument string for ``slicer.util.pip_install``: ``--no-deps`` plus the requirements.

    Raises:
        ValueError: a requirement names a package Slicer itself provides.
    """
    for req in requirements:
        base = req.split("=")[0].split(">")[0].split("<")[0].strip().lower()
        if base in PROTECTED:
            raise ValueError(f"{base} is provided by Slicer and must never be installed by this extension")
    return " ".join(["--no-deps", *requirements])
