"""Qt glue shared by the CT Diffusion SR and X-ray to CT modules: dependency installation, the weights
selector and import, the job monitor (progress, log, cancel), the training panel and the result export.

Slicer and Qt only; the decisions live in the Qt-free modules beside this one (dependencies,
weights_choice, process, training, mrml_io), which the tests run on real MRML.
"""

from __future__ import annotations

import os
import pathlib
import queue
import time

import qt
import slicer
from slicer.i18n import tr as _

CACHE_SETTINGS_KEY = "CTDiffusion/CacheFolder"
#: Milliseconds between two looks at a running job.
POLL_INTERVAL_MS = 200
PROGRESS_STEPS = 1000
#: How long after a job's start a click on its button is taken as the second click of a double click (Qt's
#: double-click interval when it can be read): Apply turns into Cancel as the job starts, so a user who double-clicks
#: Apply would otherwise start the job and cancel it at once.
DEFAULT_DOUBLE_CLICK_SECONDS = 0.5


def doubleClickSeconds() -> float:
    """The desktop's double-click interval in seconds (Qt's setting), else :data:`DEFAULT_DOUBLE_CLICK_SECONDS`."""
    try:
        return max(0.0, float(qt.QApplication.doubleClickInterval()) / 1000.0)
    except Exception:  # no QApplication (tests' stand-in), or an interval Qt does not give
        return DEFAULT_DOUBLE_CLICK_SECONDS


def ensureDependencies(training: bool = False) -> bool:
    """Install what DiffusionCore needs, after ONE confirmation: torch through the PyTorch extension
    (PyTorchUtils, with the version requirement), the other packages through pip (Slicer's numpy and
    SimpleITK pinned). False when something is missing and was not installed (the user declined, or the
    installation failed: a dialog says what happened and what to do). The decisions are in
    CTDiffusionSRLib.dependencies; this only shows dialogs and calls Slicer.
    """
    import tempfile

    from CTDiffusionSRLib import dependencies

    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    plan = dependencies.plan_dependencies(PyTorchUtils is not None, training=training)
    if not plan.missing and not plan.blocking_problem:
        return True
    if plan.blocking_problem:
        slicer.util.errorDisplay(plan.blocking_problem, windowTitle=_("PyTorch extension needed"))
        return False
    if not slicer.util.confirmOkCancelDisplay(plan.confirmation_text(), _("Install Python packages")):
        return False

    try:  # Slicer 5.12+: its own installer, told not to show a failure dialog of its own
        from slicer.packaging import pip_install as packagingPipInstall
    except ImportError:
        packagingPipInstall = None

    def installTorch(requirement):
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)

    with slicer.util.WaitCursor(), tempfile.TemporaryDirectory() as folder:
        outcome = dependencies.run_install(
            plan,
            install_torch=installTorch,
            pip_install=dependencies.quiet_pip_install(slicer.util.pip_install, packagingPipInstall),
            replan=lambda: dependencies.plan_dependencies(PyTorchUtils is not None, training=training),
            constraints_folder=folder,
        )
    if not outcome.ok:
        slicer.util.errorDisplay(outcome.message, windowTitle=_("Installation failed"), detailedText=outcome.details)
        return False
    if outcome.restart_needed:
        if slicer.util.confirmOkCancelDisplay(outcome.message + "\n\n" + _("Restart now?"), _("Restart Slicer")):
            slicer.util.restart()
        return False
    return True


def applyCacheFolderSetting() -> str:
    """Export the weights cache folder from the application settings to this process and its jobs."""
    folder = str(qt.QSettings().value(CACHE_SETTINGS_KEY, "") or "")
    if folder:
        os.environ["DIFFUSIONCORE_CACHE"] = folder
    return folder


def watchResultSaves() -> None:
    """Results loaded with a saved scene keep their provenance when Slicer saves them again
    (:func:`CTDiffusionSRLib.mrml_io.watch_results_of_loaded_scenes`); a no-op until DiffusionCore's packages are
    installed (the first Apply installs them; opening a panel then calls this again)."""
    try:
        from CTDiffusionSRLib.mrml_io import watch_results_of_loaded_scenes
    except ImportError:
        return
    watch_results_of_loaded_scenes(slicer.mrmlScene)


def fillWeightsComboBox(comboBox, family: str, current: str) -> None:
    """List the registered weights of ``family`` whose file is here, the default preselected (no torch import)."""
    from CTDiffusionSRLib.weights_choice import weights_items

    names, selected = weights_items(family, current)
    wasBlocked = comboBox.blockSignals(True)
    comboBox.clear()
    comboBox.addItems(names)
    comboBox.setCurrentText(selected)
    comboBox.blockSignals(wasBlocked)


def importWeights(family: str, statusLabel) -> str:
    """Ask for a .safetensors file and a name, register it as ``family`` weights; the name, or "" if none."""
    path = qt.QFileDialog.getOpenFileName(None, _("Import model weights"), "", _("Weights (*.safetensors)"))
    if not path or not ensureDependencies():
        return ""
    name = qt.QInputDialog.getText(
        None, _("Import model weights"), _("Name for these weights:"), qt.QLineEdit.Normal, pathlib.Path(path).stem
    )
    if not name:
        return ""
    with slicer.util.tryWithErrorDisplay(_("Could not import the weights."), waitCursor=True):
        from CTDiffusionSRLib.weights_choice import import_weights_file
        from DiffusionCore.errors import OutputExistsError

        try:
            imported, sha256 = import_weights_file(path, name, family)
        except OutputExistsError as exc:
            if not slicer.util.confirmYesNoDisplay(str(exc) + "\n\n" + _("Replace them?")):
                return ""
            imported, sha256 = import_weights_file(path, name, family, replace=True)
        statusLabel.text = _("Imported {name} (sha256 {sha}...).").format(name=imported, sha=sha256[:12])
        return imported
    return ""


class JobMonitor:
    """Follows one CLIJob from a QTimer in the GUI thread: progress bar, status label, log panel."""

    def __init__(self, progressBar, statusLabel, logTextEdit, onFinished):
        self.progressBar = progressBar
        self.statusLabel = statusLabel
        self.logTextEdit = logTextEdit
        self.onFinished = onFinished
        self.job = None
        self.startTime = 0.0
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()  # filled by the job's reader thread
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.poll)

    @property
    def running(self) -> bool:
        from CTDiffusionSRLib.process import JobState

        return self.job is not None and self.job.state == JobState.RUNNING

    def queueLine(self, line: str) -> None:  # reader thread: only store
        self._lines.put(line)

    def start(self, job, title: str) -> None:
        """Show ``job`` starting and start it. A job that cannot start (its input cannot be written, its process
        cannot be launched) is not kept: the bar is hidden, the status line says why, and the error is raised
        again for the caller's dialog."""
        self.startTime = time.monotonic()
        self.progressBar.setRange(0, PROGRESS_STEPS)
        self.progressBar.value = 0
        self.progressBar.visible = True
        self.statusLabel.text = _("{title}: starting...").format(title=title)
        self.logTextEdit.appendPlainText(_("--- {title} ---").format(title=title))
        try:
            job.start()
        except Exception as exc:
            self.progressBar.visible = False
            self.statusLabel.text = _("Could not start: {error}").format(error=exc)
            self.logTextEdit.appendPlainText(_("error: {error}").format(error=exc))
            raise
        self.job = job
        self.timer.start()

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
        self.poll()

    def poll(self) -> None:
        from CTDiffusionSRLib.process import JobState

        if self.job is None:
            self.timer.stop()
            return
        while not self._lines.empty():
            self.logTextEdit.appendPlainText(self._lines.get_nowait())
        runner = self.job.runner
        if runner is not None:
            self.progressBar.value = int(runner.progress * PROGRESS_STEPS)
            elapsed = time.monotonic() - self.startTime
            self.statusLabel.text = _("{what} ({seconds} s)").format(what=runner.comment or _("running"), seconds=f"{elapsed:.0f}")
            if self.job.state == JobState.RUNNING and runner.poll() == JobState.COMPLETED:
                # the command has ended: loading a large result into the scene takes seconds, in this thread
                self.timer.stop()  # (no poll from the events processed here)
                self.statusLabel.text = _("Loading the result into the scene...")
                app = getattr(slicer, "app", None)
                if app is not None and hasattr(app, "processEvents"):
                    app.processEvents()
        state = self.job.poll()
        if state == JobState.RUNNING:
            return
        self.timer.stop()
        elapsed = time.monotonic() - self.startTime
        notices = list(self.job.notices)  # said however the job ended (e.g. what a cancelled job kept)
        if state == JobState.COMPLETED:
            self.progressBar.value = PROGRESS_STEPS
            said = _("Done in {seconds} s.").format(seconds=f"{elapsed:.1f}")
        elif state == JobState.CANCELLED:
            said = _("Cancelled.") if self.job.kept_nodes() else _("Cancelled; nothing was added to the scene.")
        else:
            said = _("Failed: {error}").format(error=self.job.error)
            self.logTextEdit.appendPlainText(_("error: {error}").format(error=self.job.error))
        self.statusLabel.text = " ".join([said, *notices])
        for notice in notices:
            self.logTextEdit.appendPlainText(notice)
        job, self.job = self.job, None
        self.onFinished(job, state)


class TrainingPanel:
    """The Training section (the same widgets in both modules' .ui): data, config, output, start/stop."""

    def __init__(self, ui, parameterNodeGetter, defaultFamily: str):
        self.ui = ui
        self.getParameterNode = parameterNodeGetter
        self.defaultFamily = defaultFamily
        self.job = None
        self.ui.trainingVolumesSelector.setMRMLScene(slicer.mrmlScene)
        self.timer = qt.QTimer()
        self.timer.setInterval(1000)
        self.timer.connect("timeout()", self.poll)
        self.ui.trainingStartButton.connect("clicked(bool)", self.onStart)
        self.ui.trainingStopButton.connect("clicked(bool)", self.onStop)
        self.ui.trainingPresetComboBox.connect("currentIndexChanged(int)", self.onPresetSelected)
        self.ui.trainingFamilyComboBox.connect("currentIndexChanged(int)", lambda _i: self.fillPresets())
        self.ui.trainingStopButton.enabled = False
        self._presets: dict = {}
        self._shownCurve = None

    def fillPresets(self) -> None:
        try:
            from CTDiffusionSRLib.training import default_preset, list_presets
        except ImportError:
            return
        family = self.ui.trainingFamilyComboBox.currentText or self.defaultFamily
        self._presets = list_presets(family)
        self.ui.trainingPresetComboBox.clear()
        self.ui.trainingPresetComboBox.addItems([_("(defaults)"), *self._presets.keys()])
        recipe = default_preset(family)  # the shipped weights' recipe, shown as the starting point
        if recipe:
            self.ui.trainingPresetComboBox.setCurrentText(recipe)

    def onPresetSelected(self, index: int) -> None:
        name = self.ui.trainingPresetComboBox.currentText
        path = self._presets.get(name)
        self.ui.trainingConfigTextEdit.setPlainText(pathlib.Path(path).read_text() if path else "{}")

    def onStart(self) -> None:
        if not ensureDependencies(training=True):
            return
        from CTDiffusionSRLib.dependencies import tensorboard_hint
        from CTDiffusionSRLib.training import TrainingJob, output_folder_problem, own_run_config

        p = self.getParameterNode()
        output = str(p.trainingOutputFolder)
        if output in ("", "."):
            slicer.util.errorDisplay(_("Choose an output folder for checkpoints and logs."))
            return
        problem = output_folder_problem(output, p.trainingResume, p.trainingOverwrite)
        if problem:
            slicer.util.errorDisplay(problem)
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            # Nothing is written into the output folder here: the job checks everything first, then writes the run's
            # config.json and the scene volumes as it starts (a refused start leaves the folder as it was).
            ownConfig, config = own_run_config(output, p.trainingResume)
            if config is not None:  # resuming: the run's own settings, shown (a run started elsewhere has its
                self.ui.trainingConfigTextEdit.setPlainText(config.read_text(encoding="utf-8"))  # checkpoint's)
            nodes = self.ui.trainingVolumesSelector.checkedNodes() if p.trainingUseSceneVolumes else None
            self.job = TrainingJob(
                slicer.mrmlScene,
                family=p.trainingFamily,
                config_path=config,
                config_text=None if ownConfig else self.ui.trainingConfigTextEdit.toPlainText(),
                data="" if nodes is not None else p.trainingDataFolder,
                scene_volumes=nodes,
                output_dir=output,
                resume=p.trainingResume,
                overwrite=p.trainingOverwrite,
                device=p.trainingDevice,
                extra_arguments=p.trainingExtraArguments,
                from_shipped_weights=p.trainingFromShippedWeights,
                curve_name=_("Training {family}").format(family=p.trainingFamily),
            ).start()
            self.ui.tensorBoardLabel.text = tensorboard_hint(self.job.tensorboard_dir)
            self.ui.trainingStartButton.enabled = False
            self.ui.trainingStopButton.enabled = True
            self.ui.trainingStatusLabel.text = _("Training...")
            self.timer.start()

    def onStop(self) -> None:
        if self.job is not None:
            self.job.request_stop()
            self.ui.trainingStatusLabel.text = _("Stopping after a clean checkpoint...")

    def poll(self) -> None:
        from CTDiffusionSRLib.process import JobState

        if self.job is None:
            self.timer.stop()
            return
        state = self.job.poll()
        self.ui.trainingProgressBar.value = int(self.job.progress * 100)
        if self.job.curve is not None and self._shownCurve is not self.job.curve:  # each run's own curve, once
            self._shownCurve = self.job.curve
            slicer.modules.plots.logic().ShowChartInLayout(self.job.curve.chart)
        if state == JobState.RUNNING:
            return
        self.timer.stop()
        self.ui.trainingStartButton.enabled = True
        self.ui.trainingStopButton.enabled = False
        self.ui.trainingStatusLabel.text = {
            JobState.COMPLETED: _("Training ended; checkpoints are in the output folder."),
            JobState.CANCELLED: _("Training stopped."),
        }.get(state, _("Training failed: {error}").format(error=self.job.error))
        self.job = None

    def cleanup(self) -> None:
        self.timer.stop()
        if self.job is not None:
            self.job.request_stop()


def exportResultWithDialog(node) -> None:
    """Ask where and how, then write ``node`` with its provenance (DICOM series, NRRD or NIfTI). A DICOM series whose
    input holds no patient (:func:`CTDiffusionSRLib.mrml_io.export_needs_patient`) asks for the patient's ID (Cancel:
    nothing is written) and name; the series forms a new study of that patient."""
    from CTDiffusionSRLib.mrml_io import EXPORT_FILTERS, export_chosen, export_needs_patient, export_target

    if node is None:
        return
    filters = ";;".join(text for text, _suffix, _dicom in EXPORT_FILTERS)
    dialog = qt.QFileDialog(slicer.util.mainWindow(), _("Export result"), "", filters)
    dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
    if not dialog.exec_():
        return
    chosenPath, chosenFilter = dialog.selectedFiles()[0], dialog.selectedNameFilter()
    patientId = patientName = None
    if export_target(chosenPath, chosenFilter)[1] and export_needs_patient(node):
        patientId = qt.QInputDialog.getText(
            slicer.util.mainWindow(), _("Export result"),
            _("'{name}' has no patient: its input was not loaded from DICOM (or its series is not in Slicer's DICOM "
              "database), and a DICOM series needs one. The series will form a new study of the patient you name."
              "\n\nPatient ID (as the PACS knows it):").format(name=node.GetName()),
            qt.QLineEdit.Normal, "",
        )  # fmt: skip
        if not patientId:  # Cancel (PythonQt's getText gives "" for it, as for no ID): nothing is written
            return
        patientName = qt.QInputDialog.getText(
            slicer.util.mainWindow(), _("Export result"),
            _("Patient name, as Family^Given (e.g. Doe^Jane; leave it empty for none):"), qt.QLineEdit.Normal, "",
        )  # fmt: skip
    try:
        written = export_chosen(node, chosenPath, chosenFilter, patient_id=patientId, patient_name=patientName)
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the user with its message
        slicer.util.errorDisplay(_("Export failed: {error}").format(error=exc))
        return
    slicer.util.infoDisplay(_("Exported {name} to {path}").format(name=node.GetName(), path=written[0]))
