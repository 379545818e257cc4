"""DiffusionCore's version, in a module that imports nothing: what reports, provenance and DICOM headers record."""

__version__ = "0.1.0"
