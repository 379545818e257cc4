"""The training panel's logic: data export, config presets, the training process and its loss curve.

Training runs ``DiffusionTrain`` (``python -m DiffusionCore train FAMILY``) in a background process. The
trainer appends one JSON object per scalar to ``<output>/metrics.jsonl`` (``{"step", "tag", "value",
"time"}``); :class:`MetricsFollower` reads what is new and :class:`LossCurve` shows it as a Slicer plot
(one ``vtkMRMLTableNode`` per tag, one ``vtkMRMLPlotSeriesNode`` each, one ``vtkMRMLPlotChartNode``).
Stop asks for a clean checkpoint by creating ``<output>/STOP``; the process is killed only if it does not
end within a grace period.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from DiffusionCore.errors import ConfigError, InputError, OutputError, WeightsError

from .jobs import CLIJob
from .mrml_io import write_job_input
from .process import JobState

try:
    from slicer.i18n import tr as _
except ImportError:  # outside the Slicer application (tests, plain Python): the English text

    def _(text: str) -> str:
        return text


logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"
#: Seconds between the STOP file and killing a training process that did not end.
STOP_GRACE_S = 120.0
FAMILIES = ("throughplane", "sr", "vae", "xray")
#: Where each family's preset configs live, inside the DiffusionCore package.
PRESET_FOLDERS = {"throughplane": "sr/configs/throughplane", "sr": "sr/configs", "vae": "sr/configs",
                  "xray": "xray/configs"}


#: The preset holding the recipe of each family's shipped weights (``sr-default``, ``xray-default``): what the panel
#: shows when a family is chosen, as the command line trains it when no config is named.
SHIPPED_RECIPE_PRESETS = {"throughplane": "default", "xray": "stage1_default"}


#: The weights that ship for each family, which "Start from the shipped weights" continues (``--init-from``).
SHIPPED_WEIGHTS = {"throughplane": "sr-default", "xray": "xray-default"}


def default_preset(family: str) -> str:
    """The name of the preset the panel selects for ``family``: its shipped weights' recipe, or ``""`` (the config
    class's defaults) for a family with no shipped weights."""
    name = SHIPPED_RECIPE_PRESETS.get(family, "")
    return name if name in list_presets(family) else ""


def list_presets(family: str) -> dict[str, Path]:
    """Preset config files shipped with DiffusionCore for ``family``: ``{name: path}`` (may be empty)."""
    import DiffusionCore

    folder = Path(DiffusionCore.__file__).parent / PRESET_FOLDERS.get(family, "")
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.glob("*.json"))
    if family == "vae":
        files = [p for p in files if "vae" in p.stem] or files
    elif family == "sr":
        files = [p for p in files if "vae" not in p.stem] or files
    return {p.stem: p for p in files}


def shipped_weights_option(family: str, config: str | os.PathLike | Mapping) -> str:
    """The train command's option that 'Start from the shipped weights' stands for with this configuration (a preset
    file, another file, or the panel's edited settings), checked before the run starts.

    For X-ray to CT: a stage-1 configuration continues the whole of ``xray-default`` (``--init-from``), and must build
    the network it holds (its recipe is the ``stage1_default`` preset); a stage-2 configuration trains stage 2 on the
    shipped stage 1 (``--stage1-checkpoint``: the run builds stage 1 as the weights record it). Other families continue
    their shipped weights (``--init-from``).

    Raises:
        ConfigError: in the panel's words, a configuration the shipped weights cannot start.
    """
    shipped = SHIPPED_WEIGHTS[family]
    if family != "xray":
        return f"--init-from {shipped}"
    from DiffusionCore.nn.architecture import build_on_meta
    from DiffusionCore.train.checkpoint import model_differences
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
    from DiffusionCore.xray.config import load_stage_config
    from DiffusionCore.xray.train import check_stage_fits, describe_stage, read_stage_source

    cfg = load_stage_config(config if isinstance(config, Mapping) else Path(config))
    recipe = SHIPPED_RECIPE_PRESETS[family]
    if cfg.stage == 2:
        return f"--stage1-checkpoint {shipped}"
    if cfg.stage > 2:
        raise ConfigError(f"'Start from the shipped weights': {shipped} holds stage 1 only, and this configuration "
                          f"trains stage {cfg.stage}; train stage 2 on them first (a stage-2 preset with 'Start from "
                          "the shipped weights' ticked), or untick it.")  # fmt: skip
    source = read_stage_source(shipped)
    cascade = build_on_meta(lambda: UnifiedHybridViTCascade([cfg]), "the X-ray to CT cascade")
    try:
        check_stage_fits(cascade.state_dict(), [cfg], source, [1], "--init-from")
    except WeightsError:  # told in the panel's words
        name = Path(config).stem if not isinstance(config, Mapping) else ""
        which = f"the {name} preset" if name in list_presets(family) else "this configuration"
        held_cfg = source.configs.get(1)
        held = f" ({describe_stage(held_cfg)})" if held_cfg is not None else ""
        builds = describe_stage(cfg)
        if held_cfg is not None and describe_stage(held_cfg) == builds:  # the same grid and width: say what differs
            differs = model_differences(held_cfg.model, cfg.model, shipped)
            builds = f"{builds} too, but with {differs}" if differs else f"{builds} too, with other tensors"
        raise ConfigError(f"'Start from the shipped weights' continues {shipped}, which was trained with the {recipe} "
                          f"preset{held}; {which} builds {builds}: those weights do not fit it. "
                          f"Choose {recipe} in 'Config preset', a stage-2 preset to train stage 2 on them, "
                          "or untick 'Start from the shipped weights'.") from None  # fmt: skip
    return f"--init-from {shipped}"


def check_training_config(family: str, config: str | os.PathLike | Mapping) -> None:
    """Validate a training config (a file, or its settings as a dict) against the family's configuration class
    before a run starts.

    Raises:
        ConfigError: unreadable file, unknown key (with the closest valid one), wrong type or value.
    """
    source = config if isinstance(config, Mapping) else Path(config)
    if family == "xray":
        from DiffusionCore.xray.config import load_stage_config

        load_stage_config(source)
    elif family == "throughplane":
        from DiffusionCore.config import load_config
        from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig

        load_config(source, ThroughPlaneTrainConfig)
    else:
        from DiffusionCore.config import load_config
        from DiffusionCore.sr.config import SRConfig

        load_config(source, SRConfig)


#: The model each family's checkpoints hold (the ``models`` of a checkpoint's ``state.json``), which tells the family
#: of a run in an output folder; checked in this order (an SR run also holds its autoencoder, ``vae``).
FAMILY_MODELS = (("throughplane", "predictor"), ("xray", "cascade"), ("sr", "denoiser"), ("vae", "vae"))


def run_family(output_dir: str | os.PathLike) -> str | None:
    """The model family of the training run in ``output_dir``, told by the models its latest checkpoint holds (its
    ``state.json`` alone, no file hashed); None when it holds no readable checkpoint (the resume itself then says what
    is wrong), or one of no family known here."""
    from DiffusionCore.errors import DiffusionCoreError
    from DiffusionCore.train.checkpoint import read_checkpoint_info

    if not Path(output_dir).is_dir():
        return None
    try:
        models = read_checkpoint_info(output_dir).get("models", [])
    except (DiffusionCoreError, OSError, ValueError):
        return None
    if not isinstance(models, list):
        return None
    return next((family for family, model in FAMILY_MODELS if model in models), None)


def resume_family_problem(output_dir: str | os.PathLike, family: str) -> str:
    """Why Resume cannot continue the run in ``output_dir`` as a ``family`` run ("" when it can, or when the folder
    does not say): it holds a run of another model family."""
    held = run_family(output_dir)
    if held is None or held == family:
        return ""
    return _(
        "The output folder {folder} holds a '{held}' training run, not a '{family}' one: to continue it, choose "
        "'{held}' as the Model family and tick 'Resume'; to train '{family}', choose another output folder."
    ).format(folder=output_dir, held=held, family=family)


def output_folder_problem(output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> str:
    """Why a training run cannot start in ``output_dir`` with these choices ("" when it can).

    The train command refuses a folder that holds a previous run (checkpoints or exported weights) unless
    it is continued (Resume) or replaced (Overwrite); this says so before a process is started.
    """
    if resume and overwrite:
        return _("Resume continues the run in the output folder and Overwrite replaces it: tick only one of them.")
    from DiffusionCore.train.checkpoint import has_checkpoint, only_logs
    from DiffusionCore.train.outdir import previous_run

    found = previous_run(output_dir) if Path(output_dir).is_dir() else []
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    if resume and not found:  # a new or mistyped folder: said before the run's config.json is written into it
        return _(
            "The output folder {folder} holds no training run to resume. Untick 'Resume' to start a new run there, "
            "or choose the folder of the run to continue."
        ).format(folder=output_dir)
    if resume and not has_checkpoint(output_dir):  # logs or weights only: the train command would refuse --resume
        return _(
            "The output folder {folder} holds no checkpoint to resume from, only {files} (a run stopped before its "
            "first checkpoint, or weights copied there). Tick 'Overwrite' instead of 'Resume' to start the run again "
            "there, or choose the folder of the run to continue."
        ).format(folder=output_dir, files=shown)
    if resume or overwrite:
        return ""
    if not found:
        return ""
    if only_logs(found):  # a run stopped before its first checkpoint: nothing to continue
        return _(
            "The output folder {folder} holds a training run that stopped before its first checkpoint ({files}): "
            "nothing to resume. Tick 'Overwrite' to start it again there, or choose another output folder."
        ).format(folder=output_dir, files=shown)
    return _(
        "The output folder {folder} already holds a training run ({files}). Tick 'Resume' to continue it, "
        "tick 'Overwrite' to replace it, or choose another output folder."
    ).format(folder=output_dir, files=shown)


def config_settings(text: str) -> dict:
    """The settings of the panel's config text: a JSON object (an empty text is ``{}``).

    Raises:
        ConfigError: not JSON, or not a JSON object.
    """
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the training config is not valid JSON (line {exc.lineno}: {exc.msg}); fix it and retry.") from None
    if not isinstance(data, dict):
        raise ConfigError("the training config must be a JSON object ({...}) of settings.")
    return data


def write_config_text(text: str, output_dir: str | os.PathLike) -> Path:
    """Check that ``text`` is a JSON object and save it as ``<output_dir>/config.json`` (what the run uses)."""
    data = config_settings(text)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    tmp = out / ".config.json.partial"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_config(text: str, output_dir: str | os.PathLike, resume: bool) -> tuple[Path | None, bool]:
    """The config file a run from the training panel uses (None: the run's recorded settings), and whether it is the
    run's own.

    Resuming continues with the settings the run started with: its ``config.json`` is kept and used, whatever the
    panel's text now says (after a restart the text is back at the defaults, and writing it would have changed
    the run's settings half-way and lost the record of them). A run started elsewhere (the command line, a
    headless script) has no ``config.json``: it is resumed without ``--config``, so the train command continues with
    the settings its checkpoint recorded; the panel's text is neither used nor written into the run's folder (it
    was, and then every later Resume reused it). Otherwise ``text`` is checked and written (:func:`write_config_text`).
    """
    own, config = own_run_config(output_dir, resume)
    if own:
        return config, True
    return write_config_text(text, output_dir), False


def own_run_config(output_dir: str | os.PathLike, resume: bool) -> tuple[bool, Path | None]:
    """Whether a run from the training panel continues with settings of its own, as :func:`run_config` decides, without
    writing anything: ``(True, <output_dir>/config.json)`` or ``(True, None)`` (the settings its checkpoint recorded)
    for a Resume, ``(False, None)`` when the panel's text is the run's config (given to :class:`TrainingJob` as
    ``config_text``, which writes it once every check has passed)."""
    from DiffusionCore.train.checkpoint import recorded_config

    own = Path(output_dir) / "config.json"
    if resume and own.is_file():
        return True, own
    if resume and recorded_config(output_dir) is not None:
        return True, None
    return False, None


def training_data_entries(data: str | os.PathLike | None) -> list[str]:
    """The training data the panel's field names, as ``train --data`` takes them: a folder of CT volumes, a list file or
    a volume (the whole text, when it is a path here), or CT sample names and paths separated by spaces
    (``chest-lidc chest-dx``), checked by :func:`DiffusionCore.sampledata.data_entries` without fetching (the training
    command fetches a sample that is not cached yet).

    Raises:
        InputError: nothing chosen, or an entry that is neither a path here nor a CT sample's name.
    """
    from DiffusionCore.sampledata import data_entries

    try:
        return data_entries("" if data is None else data, "ct")
    except InputError as exc:
        raise InputError(f"training data: {exc}") from None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "volume"


def export_training_volumes(nodes: Sequence, folder: str | os.PathLike) -> Path:
    """Write scene volumes as NRRD files and a list file ``volumes.txt`` that ``--data`` accepts. A series
    Slicer could not load as a regular grid (a gantry-tilted CT) is given as a folder of its DICOM files instead,
    which training reads with the tilt resampled (:func:`~.mrml_io.write_job_input`)."""
    if not nodes:
        raise InputError("no volumes selected for training; pick volumes in the scene or a data folder.")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, node in enumerate(nodes):  # stored as the node's voxels (compressed), or a folder of its DICOM files
        written = write_job_input(node, out, f"{i:03d}_{_safe_name(node.GetName())}", dtype="auto", compress=True)
        lines.append(Path(written).name)
    listing = out / "volumes.txt"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return listing


class MetricsFollower:
    """Reads the records appended to a ``metrics.jsonl`` since the last call (partial last lines wait)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        records = []
        for line in data[: end + 1].decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("skipping a malformed line in %s", self.path)
                continue
            if isinstance(rec, dict) and {"step", "tag", "value"} <= rec.keys():
                records.append(rec)
        return records


class LossCurve:
    """A Slicer plot of training scalars: per tag a two-column table (step, value) and a line series.

    Args:
        scene: MRML scene.
        name: prefix of the created nodes.
        tag_filter: regular expression; only matching tags are drawn in the chart (all are tabulated).
    """

    def __init__(self, scene, name: str = "Training", tag_filter: str = "loss"):
        self.scene = scene
        self.name = name
        self.tag_filter = re.compile(tag_filter)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} loss curve"))
        self.chart.SetTitle(f"{name}: training curves")
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("value")
        self.tables: dict[str, object] = {}
        self.series: dict[str, object] = {}

    def _table(self, tag: str):
        import vtk

        if tag not in self.tables:
            table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(f"{self.name} {tag}"))
            table = table_node.GetTable()
            for col_name in ("step", tag):
                col = vtk.vtkDoubleArray()
                col.SetName(col_name)
                table.AddColumn(col)
            self.tables[tag] = table_node
            if self.tag_filter.search(tag):
                series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", self.scene.GenerateUniqueName(tag))
                series.SetAndObserveTableNodeID(table_node.GetID())
                series.SetXColumnName("step")
                series.SetYColumnName(tag)
                series.SetPlotType(series.PlotTypeScatter)
                series.SetMarkerStyle(series.MarkerStyleNone)
                series.SetUniqueColor()
                self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
                self.series[tag] = series
        return self.tables[tag]

    def add(self, records: Iterable[dict]) -> int:
        """Append records ``{"step", "tag", "value"}``; returns how many were added."""
        touched = {}
        n = 0
        for rec in records:
            table_node = self._table(str(rec["tag"]))
            table = table_node.GetTable()
            row = table.InsertNextBlankRow()
            table.SetValue(row, 0, float(rec["step"]))
            table.SetValue(row, 1, float(rec["value"]))
            touched[id(table_node)] = table_node
            n += 1
        for table_node in touched.values():
            table_node.GetTable().Modified()
            table_node.Modified()
        return n

    def values(self, tag: str) -> list[tuple[float, float]]:
        """``[(step, value), ...]`` of one tag as tabulated."""
        table = self.tables[tag].GetTable()
        return [(table.GetValue(r, 0).ToDouble(), table.GetValue(r, 1).ToDouble()) for r in range(table.GetNumberOfRows())]

    def nodes(self) -> list:
        return [self.chart, *self.tables.values(), *self.series.values()]


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (what ``mkdir(parents=True)`` would make), or
    None when ``folder`` exists."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _put_back(path: Path, content: bytes | None) -> None:
    """Restore a file written by a start that failed: its earlier ``content``, or no file (None)."""
    try:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
    except OSError as exc:
        logger.warning("could not restore %s after the failed start: %s", path, exc)


class TrainingJob(CLIJob):
    """One training run of the DiffusionTrain CLI, followed through ``metrics.jsonl``.

    Args:
        scene: MRML scene for the loss curve.
        family: "throughplane" (the shipped SR design), "sr", "vae" or "xray".
        config_path: JSON/YAML config file; None when resuming with the settings the run recorded.
        data: a folder of CT volumes, a list file, or CT sample names separated by spaces (``chest-lidc chest-dx``).
        output_dir: checkpoints, weights, TensorBoard and metrics go here.
        resume: continue from the latest checkpoint in ``output_dir``.
        overwrite: replace the previous run in ``output_dir`` (its checkpoints; its weights on export).
        device: "auto", "cpu" or "cuda".
        extra_arguments: more options of the train command (one string).
        from_shipped_weights: start from the family's shipped weights (:data:`SHIPPED_WEIGHTS`, ``--init-from``)
            instead of from scratch.
        config_text: the training panel's config text, instead of ``config_path``: checked here with everything else,
            and written as ``<output_dir>/config.json`` (the run's config) only when the job starts.
        scene_volumes: volume nodes to train on, instead of ``data``: written into ``<output_dir>/scene_volumes``
            (:func:`export_training_volumes`) only when the job starts.

    A start that is refused (here, or when the job starts) leaves the output folder as it was: nothing is written
    into it before every check has passed, and a folder made for a start that then fails is removed.
    """

    script_name = "DiffusionTrain"
    #: a run is not the scene's: it goes on when the scene is closed, and its curve is drawn again in the next one
    stop_when_scene_closes = False

    def __init__(
        self,
        scene,
        *,
        family: str,
        config_path: str | os.PathLike | None,
        data: str | os.PathLike,
        output_dir: str | os.PathLike,
        resume: bool = False,
        overwrite: bool = False,
        device: str = "auto",
        extra_arguments: str = "",
        curve_name: str = "Training",
        from_shipped_weights: bool = False,
        config_text: str | None = None,
        scene_volumes: Sequence | None = None,
        **kwargs,
    ):
        super().__init__(scene, **kwargs)
        if resume and overwrite:
            raise ConfigError(output_folder_problem(output_dir, resume, overwrite))
        if from_shipped_weights and family not in SHIPPED_WEIGHTS:
            raise ConfigError(f"no weights ship for '{family}' to start from; untick 'Start from the shipped weights' "
                              f"or choose {' or '.join(SHIPPED_WEIGHTS)}.")  # fmt: skip
        if from_shipped_weights and resume:
            raise ConfigError("Resume continues the run in the output folder from its own checkpoint; untick "
                              "'Start from the shipped weights' (or Resume) to start a new run from them.")  # fmt: skip
        if family not in FAMILIES:
            raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}.")
        if scene_volumes is None:
            training_data_entries(data)  # refused now, in the train command's words, not by the background job
        elif not scene_volumes:
            raise InputError("no volumes selected for training; pick volumes in the scene or a data folder.")
        if resume:  # nothing to resume, or another family's run: said before its config is checked as this family's
            problem = output_folder_problem(output_dir, resume=True) or resume_family_problem(output_dir, family)
            if problem:
                raise ConfigError(problem)
        if config_text is not None and config_path is not None:
            raise ValueError("give config_path or config_text, not both")
        self.config_settings = config_settings(config_text) if config_text is not None else None
        if self.config_settings is not None:
            check_training_config(family, self.config_settings)
        elif config_path is None and not resume:
            raise ConfigError("choose a training configuration (only Resume continues with the run's own settings).")
        elif config_path is not None and Path(config_path).is_file():
            check_training_config(family, config_path)
        # the train command's own option, before the user's extra ones; a resumed run continues from its checkpoint,
        # which records what it started from (the train command refuses --init-from with --resume)
        if from_shipped_weights and not (resume and family != "xray"):
            chosen = self.config_settings if self.config_settings is not None else config_path
            start = shipped_weights_option(family, chosen) if chosen is not None else f"--init-from {SHIPPED_WEIGHTS[family]}"
            extra_arguments = f"{start} {extra_arguments}".strip()
        self.scene_volumes = list(scene_volumes) if scene_volumes is not None else None
        self.family, self.data = family, str(data).strip()  # DiffusionTrain splits it as training_data_entries did
        self.config_path = Path(config_path) if config_path is not None else None
        self.output_dir = Path(output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.device, self.extra_arguments = device, extra_arguments
        self.curve_name = curve_name
        self.curve: LossCurve | None = None
        self.plotted: list[dict] = []  # every record drawn so far, to draw them again in a new scene
        self.follower = MetricsFollower(self.output_dir / METRICS_FILE)
        self._stop_requested_at: float | None = None

    @property
    def tensorboard_dir(self) -> Path:
        """The folder to point TensorBoard at (``tensorboard --logdir``)."""
        return self.output_dir

    def start(self) -> TrainingJob:
        """Write what the run needs into the output folder and start it (:meth:`prepare`); when that fails, the folder
        is left as it was: a folder made for it is removed, and a ``config.json`` it replaced is put back."""
        made = _first_missing(self.output_dir)
        config = self.output_dir / "config.json"
        before = config.read_bytes() if self.config_settings is not None and config.is_file() else None
        try:
            return super().start()
        except BaseException:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            elif self.config_settings is not None:
                _put_back(config, before)
            raise

    def prepare(self, tempdir: Path) -> list[str]:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {self.output_dir}: {exc}") from None
        if self.config_settings is not None:  # every check has passed: the run's config, then its data
            self.config_path = write_config_text(json.dumps(self.config_settings), self.output_dir)
        if self.scene_volumes is not None:
            self.data = str(export_training_volumes(self.scene_volumes, self.output_dir / "scene_volumes"))
        stop = self.output_dir / STOP_FILE
        if stop.exists():
            stop.unlink()  # a STOP left from the previous run would end this one at once
        if not self.resume and (self.output_dir / METRICS_FILE).exists():  # a new run: plot only its own
            self.follower.offset = (self.output_dir / METRICS_FILE).stat().st_size
        args = [
            "--family", self.family, "--config", str(self.config_path or ""), "--data", str(self.data),
            "--outputDirectory", str(self.output_dir), "--device", self.device,
        ]
        if self.resume:
            args.append("--resume")
        if self.overwrite:
            args.append("--overwrite")
        if self.extra_arguments:
            args += ["--extraArguments", self.extra_arguments]
        return args

    def update(self) -> None:
        records = self.follower.read_new()
        self.plotted.extend(records)
        if self.curve is not None and not self.scene.IsNodePresent(self.curve.chart):
            # the scene was closed (or the chart deleted): the run goes on, so its curve is drawn again, whole
            self.curve, records = None, list(self.plotted)
        if records:
            if self.curve is None:
                self.curve = LossCurve(self.scene, self.curve_name)
            self.curve.add(records)
        if self._stop_requested_at is not None and time.monotonic() - self._stop_requested_at > STOP_GRACE_S:
            logger.warning("training did not stop within %.0f s of the STOP request; killing it", STOP_GRACE_S)
            self._stop_requested_at = None
            self.runner.cancel()

    def import_results(self, tempdir: Path) -> list:
        self.update()
        return self.curve.nodes() if self.curve else []

    def _remove_created_nodes(self) -> None:
        # A stopped or failed run keeps its curve: the user wants to see how far it got.
        self.created_nodes = []

    def request_stop(self) -> None:
        """Ask the trainer to write a clean checkpoint and end (``STOP`` file); killed after a grace period."""
        if self.state == JobState.RUNNING:
            (self.output_dir / STOP_FILE).write_text("stop requested from 3D Slicer\n", encoding="utf-8")
            self._stop_requested_at = time.monotonic()
