"""Probe 25 (hospital IT on a locked-down workstation), the command line's side: a reader that closes the pipe
(``| head -1``), a process started with stdout or stderr closed (cron, daemons), argument errors that named a hidden
argument or gave no hint for a file name starting with ``-``, out-of-memory advice that fits ``sr``'s weights, no
writable temporary folder at all, and a path whose name is over 255 bytes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from DiffusionCore.cli import sr as cli_sr
from DiffusionCore.cli.common import run_guarded
from DiffusionCore.cli.main import main
from DiffusionCore.errors import ConfigError
from DiffusionCore.nn.architecture import build_on_meta
from DiffusionCore.volume import Volume, write_volume

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
FAST_SR = ["--factor", "2", "--no-adapt", "--progress", "none"]
TINY_XRAY = ["--tiny-test-model", "--progress", "none"]


def _dc(*args: str) -> list[str]:
    return [sys.executable, "-m", "DiffusionCore", *args]


def run_cli(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python -m DiffusionCore ARGS``; stdout and stderr read back unless ``kwargs`` route them elsewhere."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(_dc(*args), cwd=cwd, env=ENV, timeout=300, encoding="utf-8", errors="backslashreplace",
                          **kwargs)  # fmt: skip


def in_shell(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bash -c SCRIPT`` with ``$1...`` the arguments: for redirections Python's subprocess cannot make
    (``2>&-`` closes the descriptor; ``stderr=DEVNULL`` keeps it open)."""
    return subprocess.run(["bash", "-c", script, "bash", *args], cwd=cwd, env=ENV, capture_output=True, timeout=300,
                          encoding="utf-8", errors="backslashreplace")  # fmt: skip


@pytest.fixture(scope="module")
def thick_ct(tmp_path_factory) -> Path:
    """A 24^3 chest-like CT of 10 mm slices, 2 mm in plane: something for ``sr`` to do, in a fraction of a second."""
    from conftest import chest_like_ct

    path = tmp_path_factory.mktemp("thick") / "ct.nii.gz"
    write_volume(Volume(chest_like_ct(), (10.0, 2.0, 2.0)), path)
    return path


@pytest.fixture()
def radiograph(tmp_path) -> Path:
    path = tmp_path / "chest.png"
    Image.fromarray((np.random.default_rng(0).random((72, 64)) * 255).astype(np.uint8)).save(path)
    return path


# -- D4: a reader that closed the pipe ---------------------------------------------------------------------------
def _with_reader_gone(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The command with its stdout a pipe whose reading end is closed before it starts: every write meets EPIPE,
    as after ``| head -1`` once head has exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(_dc(*args), cwd=cwd, env={**ENV, **env}, stdout=write_end, stderr=subprocess.PIPE,
                              timeout=300, encoding="utf-8", errors="backslashreplace")  # fmt: skip
    finally:
        os.close(write_end)


def _quiet_about_the_pipe(stderr: str) -> None:
    assert "internal error" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr  # the interpreter's own flush at exit


def test_a_closed_stdout_pipe_does_not_fail_a_listing(tmp_path):
    for argv in (["sample-data", "--list"], ["weights", "list"]):
        proc = _with_reader_gone(*argv, cwd=tmp_path, DIFFUSIONCORE_CACHE=str(tmp_path / "cache"))
        assert proc.returncode == 0, (argv, proc.stderr)  # before: exit 1, "internal error (BrokenPipeError ...)"
        _quiet_about_the_pipe(proc.stderr)


def test_a_closed_stdout_pipe_keeps_the_result_and_exit_code_0(tmp_path, radiograph):
    out = tmp_path / "ct.nii.gz"
    proc = _with_reader_gone("xray2ct", str(radiograph), str(out), *TINY_XRAY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _quiet_about_the_pipe(proc.stderr)
    assert out.stat().st_size > 0


def test_main_gives_back_the_streams_it_found(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path / "cache"))
    before = sys.stdout, sys.stderr
    assert main(["sample-data", "--list"]) == 0
    assert (sys.stdout, sys.stderr) == before
    assert "chest-dx" in capsys.readouterr().out


# -- D9: stdout or stderr closed when the process starts ----------------------------------------------------------
def test_a_closed_stderr_does_not_stop_sr(tmp_path, thick_ct):
    out = tmp_path / "sr.nii.gz"
    proc = in_shell('"$@" 2>&-', *_dc("sr", str(thick_ct), str(out), *FAST_SR), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout  # before: exit 1, "internal error (AttributeError ... 'flush')"
    assert "error" not in proc.stdout, proc.stdout
    assert out.stat().st_size > 0


def test_closed_stdout_and_stderr_do_not_stop_xray2ct_with_a_progress_bar(tmp_path, radiograph):
    out = tmp_path / "ct.nii.gz"
    proc = in_shell('"$@" >&- 2>&-', *_dc("xray2ct", str(radiograph), str(out), "--tiny-test-model"), cwd=tmp_path)
    assert proc.returncode == 0
    assert out.stat().st_size > 0


def test_a_run_with_stderr_closed_still_exits_with_its_error_code(tmp_path):
    proc = in_shell('"$@" 2>&-', *_dc("sr", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.nii.gz"),
                                      *FAST_SR), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""  # the message is dropped with stderr, not moved to stdout


# -- D10: argument errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, required", [(["sr", "in.nii.gz"], "OUTPUT"),
                                            (["xray2ct", "chest.png"], "OUTPUT"),
                                            (["sr"], "INPUT, OUTPUT")])  # fmt: skip
def test_a_missing_argument_names_no_hidden_one(argv, required, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: the following arguments are required: {required}; see python -m DiffusionCore " \
                  f"{argv[0]} --help\n"  # fmt: skip


def test_a_file_name_starting_with_a_dash_gets_a_hint(tmp_path, thick_ct, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(thick_ct, tmp_path / "-in.nii.gz")
    assert main(["sr", "-in.nii.gz", "-out.nii.gz"]) == 2
    assert capsys.readouterr().err == ("error: -in.nii.gz looks like an option: write ./-in.nii.gz, or put -- before "
                                       "the paths; see python -m DiffusionCore sr --help\n")  # fmt: skip
    # an existing file without a volume's suffix, and an output that does not exist yet, are named too
    (tmp_path / "-chest").write_bytes(b"")
    assert main(["xray2ct", "-chest", "ct.nii.gz"]) == 2
    assert "-chest looks like an option: write ./-chest" in capsys.readouterr().err
    assert main(["sr", "./-in.nii.gz", "-out.nii.gz"]) == 2
    assert "-out.nii.gz looks like an option: write ./-out.nii.gz" in capsys.readouterr().err
    # an unknown option that names no file keeps argparse's words
    assert main(["sr", "in.nii.gz", "out.nii.gz", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# -- D6: out-of-memory advice ----------------------------------------------------------------------------------------
def test_sr_out_of_memory_advice_holds_for_the_shipped_weights(monkeypatch, capsys):
    """The shipped sr-default (a through-plane predictor) takes no patches: "use smaller patches" could not help."""

    def out_of_memory(args):
        raise MemoryError()

    monkeypatch.setattr(cli_sr, "run", out_of_memory)
    assert main(["sr", "in.nii.gz", "out.nii.gz"]) == 5
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: use a smaller --factor (or a larger --target-spacing), --no-adapt"), err
    assert "--memory-limit" in err and "with weights that take them, fewer --num-samples or a smaller --patch-size" in err
    assert err.endswith(", or use a machine with more memory.\n") and err.count("\n") == 1


def test_onednn_allocation_failure_is_out_of_memory(capsys):
    def body():
        raise RuntimeError("could not create a primitive")  # oneDNN's words for a buffer it could not allocate

    assert run_guarded(body, memory_hint="use less") == 5
    assert capsys.readouterr().err == "error: out of memory: use less, or use a machine with more memory.\n"

    def unsupported():  # a shape or type oneDNN has no kernel for: no memory would help
        raise RuntimeError("could not create a primitive descriptor for a deconvolution forward propagation primitive")

    assert run_guarded(unsupported) == 1
    assert capsys.readouterr().err.startswith("error: internal error (RuntimeError: could not create a primitive desc")


# -- D3: no writable temporary folder --------------------------------------------------------------------------------
@pytest.fixture()
def no_temporary_folder(tmp_path, monkeypatch):
    """``tempfile`` finds no usable folder (it tries TMPDIR, /tmp, /var/tmp, /usr/tmp and the current folder)."""
    gone = [str(tmp_path / "no-tmp"), str(tmp_path / "no-var-tmp")]
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: list(gone))
    return gone


def test_no_temporary_folder_is_not_blamed_on_the_weights(no_temporary_folder, capsys):
    def stage():  # torch asks for its cache folder, in the temporary folder, while a stage's layers are built
        tempfile.gettempdir()

    with pytest.raises(FileNotFoundError, match="No usable temporary directory"):  # before: a ConfigError
        build_on_meta(stage, "stage 1 of the cascade")
    with pytest.raises(ConfigError, match="cannot be built"):  # a constructor's own failure is still the config's
        build_on_meta(lambda: 1 / 0, "stage 1 of the cascade")
    assert run_guarded(lambda: build_on_meta(stage, "stage 1")) == 4
    tried = ", ".join(no_temporary_folder)
    assert capsys.readouterr().err == (f"error: no writable temporary folder (tried {tried}): set TMPDIR to a folder "
                                       "you can write\n")  # fmt: skip


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


NO_TMP_SCRIPT = """
set -e
mount --make-rprivate /
for d in /tmp /var/tmp; do mount --bind "$d" "$d"; mount -o remount,ro,bind "$d"; done
mount -t tmpfs tmpfs "$OUT"
unset TMPDIR TEMP TMP
cd "$CWD"
set +e
"$PY" -m DiffusionCore xray2ct "$XRAY" "$OUT/ct.nii.gz" --progress none
echo "rc=$?"
test -s "$OUT/ct.nii.gz" && echo written
"""


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and unshare -m for read-only /tmp and /var/tmp")
def test_xray2ct_without_any_writable_temporary_folder(tmp_path, radiograph):
    """/tmp, /var/tmp and the current folder read-only, TMPDIR unset: the shipped weights were called damaged."""
    (tmp_path / "out").mkdir()
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run(["unshare", "-m", "bash", "-c", NO_TMP_SCRIPT], capture_output=True, timeout=600,
                          encoding="utf-8", errors="backslashreplace",
                          env={**ENV, "OUT": str(tmp_path / "out"), "CWD": str(tmp_path / "cwd"),
                               "PY": sys.executable, "XRAY": str(radiograph)})  # fmt: skip
    assert "damaged" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    if "rc=0" in proc.stdout:  # a torch that asks for no temporary folder: the run goes through
        assert "written" in proc.stdout
    else:
        assert "rc=4" in proc.stdout, (proc.stdout, proc.stderr)
        assert proc.stderr.splitlines()[-1].startswith("error: no writable temporary folder (tried /tmp, /var/tmp")
        assert proc.stderr.splitlines()[-1].endswith("set TMPDIR to a folder you can write")


# -- D8: a name over 255 bytes ----------------------------------------------------------------------------------------
def test_a_name_over_255_bytes_is_a_path_problem_not_an_internal_error(tmp_path, thick_ct):
    long_name = "n" * 260
    for argv in (["sr", str(thick_ct), str(tmp_path / f"{long_name}.nii.gz")],
                 ["sr", str(tmp_path / f"{long_name}.nii.gz"), str(tmp_path / "o.nii.gz")],
                 ["sr", str(thick_ct), str(tmp_path / "o.nii.gz"), "--weights", str(tmp_path / f"{long_name}.st")]):
        proc = run_cli(*argv, *FAST_SR, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr  # before: 1, "internal error (OSError: [Errno 36] ...)"
        assert lines[-1].startswith(f"error: the path {tmp_path}/{long_name}"), lines
        assert "a name there may have at most 255 bytes; a path at most 4096" in lines[-1]
        assert "internal error" not in proc.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_name_too_long_without_a_path_is_still_one_line(capsys):
    def body():
        raise OSError(errno.ENAMETOOLONG, "File name too long")

    assert run_guarded(body) == 2
    assert capsys.readouterr().err.startswith("error: a path is too long for the file system: a name there may have")
