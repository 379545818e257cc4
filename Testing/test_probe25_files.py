"""A locked-down workstation (probe 25): no home folder, no writable temporary folder, a full disk or a file-size limit
(``ulimit -f``) under a report, a weights file whose name starts with ``-``, a read-only cache. Each case runs the real
command (in a subprocess where the environment must differ: no HOME, a file-size limit) or the real library call, and
checks what the user sees: the exit code, the one ``error:`` line and what is left on disk."""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ct_phantom_array

from DiffusionCore import files
from DiffusionCore.errors import OutputError, WeightsError
from DiffusionCore.volume import Volume, read_volume, write_volume
from DiffusionCore.weights import registry

try:
    import resource  # POSIX: the file-size limit (ulimit -f)
except ImportError:  # Windows
    resource = None

#: The cases that need POSIX: a user database (pwd), a file-size limit (resource), a process started with one.
posix_only = pytest.mark.skipif(os.name != "posix" or resource is None, reason="POSIX only (pwd, ulimit -f)")

SHIPPED_SR = Path(registry.__file__).with_name("sr-default.safetensors")

#: Runs ``python -m DiffusionCore ARGS`` as an account with no home folder: HOME is unset by the caller, and the user
#: database has no entry for the uid (a container, systemd DynamicUser), which is what makes ``pwd.getpwuid`` fail.
NO_PASSWD_ENTRY = """
import pwd, runpy, sys
def no_entry(*args):
    raise KeyError("getpwuid(): uid not found: 12345")
pwd.getpwuid = pwd.getpwnam = no_entry
sys.argv = ["DiffusionCore", *sys.argv[1:]]
runpy.run_module("DiffusionCore", run_name="__main__", alter_sys=True)
"""


def _ct() -> Volume:
    return Volume(ct_phantom_array((6, 24, 24)), spacing=(0.8, 0.8, 4.0))


def _env(**changes: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key, value in changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    return env


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _no_traceback(stderr: str) -> bool:
    return "Traceback" not in stderr


@pytest.fixture
def file_size_limit():
    """``set(n)`` lowers this process's file-size limit (``ulimit -f``) to ``n`` bytes; put back afterwards. Python
    ignores SIGXFSZ, so a write past it fails with EFBIG, as in a shell with ``ulimit -f``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def set_limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte (a file that grows until the system says ENOSPC)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- D2: no home folder -------------------------------------------------------------------------------------------
@posix_only
def test_without_a_home_folder_help_and_local_files_work_and_the_cache_asks_for_diffusioncore_cache(tmp_path):
    """HOME unset and no passwd entry: `--help` and `sr` with the shipped weights on a local file work; what needs the
    cache (a sample's name, `weights import`) stops with one line saying to set DIFFUSIONCORE_CACHE, exit 4, not a
    traceback; `sample-data --list` lists the samples, their state unknown, and says the same in its last line."""
    write_volume(_ct(), tmp_path / "ct.nii.gz")
    script = tmp_path / "no_passwd_entry.py"
    script.write_text(NO_PASSWD_ENTRY, encoding="utf-8")
    env = _env(HOME=None, DIFFUSIONCORE_CACHE=None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                              encoding="utf-8", timeout=300)  # fmt: skip

    for args in (["--help"], ["sample-data", "--help"], ["weights", "--help"]):
        proc = run(*args)
        assert proc.returncode == 0 and _no_traceback(proc.stderr), (args, proc.stderr)
    assert "~/.cache/diffusioncore/sample-data" in run("sample-data", "--help").stdout

    proc = run("sr", "ct.nii.gz", "out.nii.gz", "--factor", "2", "--no-adapt", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert read_volume(tmp_path / "out.nii.gz").shape[0] > 6

    proc = run("weights", "list")
    assert proc.returncode == 0 and "sr-default" in proc.stdout, proc.stderr

    # listing needs no cache: every sample with its licence, the state unknown, and the last line says what to set
    proc = run("sample-data", "--list")
    assert proc.returncode == 0 and _no_traceback(proc.stderr), proc.stderr
    assert "chest-lidc" in proc.stdout and "licence" in proc.stdout and " unknown " in proc.stdout, proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("cache: no cache folder") and "set DIFFUSIONCORE_CACHE" in last, last

    for args in (["sr", "chest-dx", "out2.nii.gz"],
                 ["weights", "import", str(SHIPPED_SR), "--name", "mine"]):  # fmt: skip
        proc = run(*args)
        assert proc.returncode == 4, (args, proc.stderr)
        assert _no_traceback(proc.stderr), proc.stderr
        (line,) = _error_lines(proc.stderr)
        assert "no home folder" in line and "set DIFFUSIONCORE_CACHE" in line, line
    assert not (tmp_path / "~").exists()  # nothing written under a literal "~" folder


@posix_only
def test_without_a_home_folder_the_python_api_finds_the_bundled_weights(monkeypatch):
    """The same account in Python: the bundled registry resolves with no user registry; cache_dir() raises the
    OutputError that says what to set; the names shown in help texts do not fail."""
    import pwd

    from DiffusionCore import sampledata

    def no_entry(*args):
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("DIFFUSIONCORE_CACHE", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(OutputError, match="set DIFFUSIONCORE_CACHE to the full path of a folder you can write"):
        files.cache_dir()
    assert registry.resolve_weights("sr-default", family="sr").path == SHIPPED_SR.resolve()
    assert [w["name"] for w in registry.list_weights("sr")] == ["sr-default"]
    assert str(sampledata.sample_root()) == "~/.cache/diffusioncore/sample-data"
    assert str(registry.user_registry_path()) == "~/.cache/diffusioncore/weights/registry.json"
    with pytest.raises(OutputError, match="no home folder"):
        sampledata.cache_state("chest-lidc")
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", "~/cache")  # set in a unit file, where no shell expands ~
    with pytest.raises(OutputError, match="DIFFUSIONCORE_CACHE=~/cache starts with ~"):
        files.cache_dir()


# -- D3: no writable temporary folder ------------------------------------------------------------------------------
def test_volumes_are_read_and_written_when_no_temporary_file_can_be_made(tmp_path, monkeypatch):
    """TMPDIR, /tmp, /var/tmp and the current folder unwritable: the capture of ITK's console output needs a temporary
    file; without one the volume is still read and written (ITK's lines then go to stderr)."""

    def no_temporary_folder(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp', '/var/tmp']")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_temporary_folder)
    for name in ("ct.nii.gz", "ct.nrrd", "ct.mha"):
        write_volume(_ct(), tmp_path / name)
        assert read_volume(tmp_path / name).shape == (6, 24, 24)
    with files.native_stderr_captured() as lines:
        pass
    assert lines == []


# -- D5: a report on a full disk or past the file-size limit --------------------------------------------------------
def test_a_report_on_a_full_disk_is_an_output_error_and_leaves_no_partial_file(tmp_path, small_disk):
    """`sr --report` onto a full disk: exit 4 and the volume writers' words for a full disk, not an internal error;
    no hidden temporary file is left beside the report."""
    _fill(small_disk)
    write_volume(_ct(), tmp_path / "ct.nii.gz")
    report = small_disk / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "sr", "ct.nii.gz", "out.nii.gz", "--factor", "2", "--no-adapt",
         "--progress", "none", "--report", str(report)],
        cwd=tmp_path, env=_env(), capture_output=True, encoding="utf-8", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert f"could not write {report}: the disk holding {small_disk} is full" in line, line
    assert "free some space there or write to another folder" in line, line
    assert not report.exists() and _leftovers(small_disk) == []

    with pytest.raises(OutputError, match="is full"):
        files.write_json_atomic({"scores": list(range(1000))}, small_disk / "scores.json")
    assert _leftovers(small_disk) == [] and not (small_disk / "scores.json").exists()


@posix_only
def test_a_json_past_the_file_size_limit_says_so(tmp_path, file_size_limit):
    """`ulimit -f` below the size of a JSON (EFBIG): an OutputError naming the limit, not a full disk; no partial."""
    file_size_limit(4096)
    with pytest.raises(OutputError) as caught:
        files.write_json_atomic({"scores": list(range(5000))}, tmp_path / "scores.json")
    file_size_limit(resource.RLIM_INFINITY)
    message = str(caught.value)
    assert "the file would exceed this session's file-size limit (ulimit -f: 4.0 KiB" in message, message
    assert "raise it" in message and "is full" not in message
    assert list(tmp_path.iterdir()) == []


# -- D7: a volume past the file-size limit --------------------------------------------------------------------------
@posix_only
@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
def test_a_volume_past_the_file_size_limit_is_not_called_a_full_disk(tmp_path, file_size_limit, name):
    """ITK cut short by `ulimit -f`: "the file would exceed this session's file-size limit", never "the disk is full"
    on a disk with room, and no partial file is left."""
    vol = Volume(ct_phantom_array((16, 64, 64)), spacing=(0.8, 0.8, 2.0))  # 128 KiB of int16 voxels, 256 of float
    file_size_limit(16 << 10)
    try:
        with pytest.raises(OutputError) as caught:
            write_volume(vol, tmp_path / name)
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    message = str(caught.value)
    assert f"could not write {tmp_path / name}: the file would exceed this session's file-size limit" in message
    assert "ulimit -f: 16.0 KiB" in message and "is full" not in message, message
    assert list(tmp_path.iterdir()) == []


@posix_only
def test_the_sr_command_past_the_file_size_limit_exits_4_naming_the_limit(tmp_path):
    """The command as the tester ran it, in a shell with `ulimit -f 40` (KiB)."""
    write_volume(Volume(ct_phantom_array((8, 48, 48)), spacing=(0.8, 0.8, 4.0)), tmp_path / "ct.nii.gz")

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "sr", "ct.nii.gz", "out.nrrd", "--factor", "4", "--no-adapt",
         "--progress", "none"],
        cwd=tmp_path, env=_env(), capture_output=True, encoding="utf-8", timeout=300, preexec_fn=limited,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert "could not write out.nrrd: the file would exceed this session's file-size limit (ulimit -f: 40.0 KiB" in line
    assert "is full" not in line and ".partial" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_file_too_large_without_a_session_limit_names_the_file_system(tmp_path, monkeypatch):
    """EFBIG with no `ulimit -f`: the file system's own largest file (FAT32 on a USB stick)."""
    monkeypatch.setattr(files, "file_size_limit", lambda: None)
    why = files.no_room_reason(tmp_path, 5 << 30, OSError(errno.EFBIG, os.strerror(errno.EFBIG)))
    assert why.startswith(f"the file is larger than the file system holding {tmp_path} takes"), why
    assert files.no_room_reason(tmp_path, 1 << 10, OSError(errno.EACCES, "Permission denied")) == ""


# -- D11: a weights file whose name starts with "-" ------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="pasted into a POSIX shell")
def test_the_register_command_for_a_dash_led_weights_file_can_be_pasted(tmp_path, monkeypatch, cache_home):
    """`--weights=-w.safetensors` unregistered: the message's `weights import ...` command, pasted as it is, imports
    the file (the name is written ./-w.safetensors, which the command cannot take for an option)."""
    tensors, metadata = registry.load_safetensors(SHIPPED_SR)
    monkeypatch.chdir(tmp_path)
    registry.save_safetensors("-w.safetensors", tensors, {**metadata, "note": "a copy of mine"})
    with pytest.raises(WeightsError) as caught:
        registry.resolve_weights(Path("-w.safetensors"), family="sr")
    command = str(caught.value).split("`")[1]
    assert command == "python -m DiffusionCore weights import ./-w.safetensors --name NAME", command
    argv = shlex.split(command.replace("NAME", "mine"))
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=_env(), capture_output=True,
                          encoding="utf-8", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "mine" in json.loads((cache_home / "weights" / "registry.json").read_text())["weights"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell quoting")
def test_shell_word_keeps_its_quoting_and_leaves_names_alone():
    assert registry.shell_word(Path("-w.safetensors")) == "./-w.safetensors"
    assert registry.shell_word(Path("-my weights.safetensors")) == "'./-my weights.safetensors'"
    assert registry.shell_word(Path("/abs/-w.safetensors")) == "/abs/-w.safetensors"
    assert registry.shell_word(Path("Ärzte/w 1.safetensors")) == "'Ärzte/w 1.safetensors'"
    assert registry.shell_word("sr-default") == "sr-default"  # a name, not a path


# -- D13: weights import into a read-only cache ---------------------------------------------------------------------
def test_weights_import_into_a_read_only_cache_says_to_point_diffusioncore_cache_elsewhere(
    tmp_path, cache_home, monkeypatch, capsys
):
    """The cache on a read-only file system (root is not stopped by permissions: the system's EROFS is raised for
    files created there): exit 4, and the advice `sample-data` gives in the same place."""
    from DiffusionCore.cli.main import main

    real_mkstemp = tempfile.mkstemp

    def read_only_cache(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(cache_home.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_cache)
    assert main(["weights", "import", str(SHIPPED_SR), "--name", "mine"]) == 4
    (line,) = _error_lines(capsys.readouterr().err)
    assert "Read-only file system" in line and "point DIFFUSIONCORE_CACHE to a folder you can write" in line, line
    assert not (cache_home / "weights" / "registry.json").exists()
    assert not any((cache_home / "weights").glob("*.safetensors"))
