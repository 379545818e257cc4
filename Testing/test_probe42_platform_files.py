"""Probe 42 (Windows and macOS), the file helpers, simulated on Linux: the peak memory of a run where there is no
``resource`` module (Windows) or ``ru_maxrss`` is in bytes (macOS); the free memory from the system's own calls; a
network drive that numbers no inodes (``st_ino`` 0); Windows' 260-character path limit; outputs that differ only in
letter case on macOS; a batch with inputs on two drives; the cache folder under ``%LOCALAPPDATA%``.

The Windows and macOS APIs are faked where ctypes would reach them (``ctypes.WinDLL``, ``ctypes.CDLL(None)``), the
platform is switched only for the call under test (``files.ON_WINDOWS``, ``sys.platform``), and drive letters come
from ``ntpath``."""

from __future__ import annotations

import contextlib
import ctypes
import json
import ntpath
import os
import pathlib
import sys
import types
from pathlib import Path

import pytest
from test_sr_pipeline import thick_ct

from DiffusionCore import files
from DiffusionCore.cli import batch
from DiffusionCore.cli.main import main
from DiffusionCore.errors import OutputError, ResourceError
from DiffusionCore.volume import write_volume

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--tiny-test-model", "--no-adapt", "--progress", "none", "--factor", "2")
GiB = 1 << 30

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_proc(monkeypatch):
    """No ``/proc`` and no cgroup files, as on Windows and macOS."""
    monkeypatch.setattr(files, "proc_bytes", lambda path, key: None)
    monkeypatch.setattr(files, "_cgroup_available", lambda: None)


def fake_windows_dlls(monkeypatch, *, peak: int = 0, avail_phys: int = 0, avail_page_file: int = 0) -> None:
    """``ctypes.WinDLL`` answering GetCurrentProcess / GetProcessMemoryInfo and GlobalMemoryStatusEx as Windows
    would, with the given figures."""

    def get_process_memory_info(handle, counters_ref, size):
        counters = counters_ref._obj
        assert size == ctypes.sizeof(counters) and counters.cb == size
        counters.PeakWorkingSetSize = peak
        return 1

    def global_memory_status_ex(status_ref):
        status = status_ref._obj
        assert status.dwLength == ctypes.sizeof(status)  # the call fails on Windows without it
        status.ullAvailPhys, status.ullAvailPageFile = avail_phys, avail_page_file
        return 1

    dlls = {
        "kernel32": types.SimpleNamespace(GetCurrentProcess=lambda: -1,
                                          GlobalMemoryStatusEx=global_memory_status_ex),
        "psapi": types.SimpleNamespace(GetProcessMemoryInfo=get_process_memory_info),
    }  # fmt: skip
    monkeypatch.setattr(ctypes, "WinDLL", lambda name: dlls[name], raising=False)


# -- D1 / M1: the peak memory at the end of every run --------------------------------------------------------------
def test_peak_memory_is_the_peak_working_set_on_windows_where_there_is_no_resource_module(monkeypatch, no_proc):
    fake_windows_dlls(monkeypatch, peak=123_456_789)
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource: ImportError, as on Windows
    assert files.peak_rss_bytes() == 123_456_789


def test_peak_memory_is_0_not_an_error_where_nothing_tells_it(monkeypatch, no_proc):
    monkeypatch.delattr(ctypes, "WinDLL", raising=False)
    monkeypatch.setitem(sys.modules, "resource", None)
    assert files.peak_rss_bytes() == 0


def test_peak_memory_on_macos_is_ru_maxrss_itself_which_is_in_bytes_there(monkeypatch, no_proc):
    usage = types.SimpleNamespace(ru_maxrss=400_000_000)
    monkeypatch.setitem(sys.modules, "resource", types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: usage))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert files.peak_rss_bytes() == 400_000_000  # 381 MiB, not 372 GiB
    monkeypatch.setattr(sys, "platform", "linux")
    assert files.peak_rss_bytes() == 400_000_000 * 1024  # kibibytes on Linux (where /proc is missing)


def test_sr_without_a_resource_module_writes_its_result_and_reports_the_peak(tmp_path, monkeypatch):
    """Windows: every SR run computed its result, then failed with "the Python package 'resource' ... is not
    installed" and wrote nothing."""
    src = write_volume(thick_ct(), tmp_path / "ct.nii.gz")
    out, report = tmp_path / "out.nii.gz", tmp_path / "report.json"
    monkeypatch.setattr(files, "proc_bytes", lambda path, key: None)
    monkeypatch.setitem(sys.modules, "resource", None)
    fake_windows_dlls(monkeypatch, peak=987_654_321)
    assert main(["sr", str(src), str(out), *FAST, "--report", str(report)]) == 0
    assert out.is_file()
    assert json.loads(report.read_text(encoding="utf-8"))["memory"]["peak_rss_bytes"] == 987_654_321


# -- D2: the free memory on Windows and macOS -----------------------------------------------------------------------
def test_on_windows_the_free_memory_is_measured_and_a_run_too_large_is_refused(monkeypatch, no_proc):
    monkeypatch.delenv(files.MEMORY_LIMIT_ENV, raising=False)
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    monkeypatch.delattr(os, "sysconf")  # Windows has none
    fake_windows_dlls(monkeypatch, avail_phys=3 * GiB, avail_page_file=6 * GiB)
    assert files.host_available_memory() == 3 * GiB
    with pytest.raises(ResourceError, match=r"needs about 500\.0 GiB, but 3\.0 GiB is available"):
        files.check_memory_for(500 * GiB, "reading ct.nii.gz", "crop the volume")
    fake_windows_dlls(monkeypatch, avail_phys=3 * GiB, avail_page_file=1 * GiB)  # the commit limit binds
    assert files.host_available_memory() == 1 * GiB


def fake_macos_libc(monkeypatch, *, memsize: int, page: int, free: int, inactive: int,
                    statistics_ok: bool = True) -> list[int]:  # fmt: skip
    """``ctypes.CDLL(None)`` answering sysctlbyname("hw.memsize"), mach_host_self, host_page_size and
    host_statistics64, in a process that has not taken its host port yet; returns the ports mach_host_self gave."""
    taken: list[int] = []

    def mach_host_self():
        taken.append(7)
        return 7

    def sysctlbyname(name, oldp, oldlenp, newp, newlen):
        assert name == b"hw.memsize" and oldlenp._obj.value == 8
        oldp._obj.value = memsize
        return 0

    def host_page_size(host, size_ref):
        assert host == 7
        size_ref._obj.value = page
        return 0

    def host_statistics64(host, flavor, counts_ref, count_ref):
        assert host == 7 and flavor == 4 and count_ref._obj.value == 38  # HOST_VM_INFO64, HOST_VM_INFO64_COUNT
        if not statistics_ok:
            return 5  # KERN_FAILURE
        counts = counts_ref._obj
        counts[0], counts[1], counts[2] = free, 999_999, inactive  # free_count, active_count, inactive_count
        return 0

    libc = types.SimpleNamespace(sysctlbyname=sysctlbyname, mach_host_self=mach_host_self,
                                 host_page_size=host_page_size,
                                 host_statistics64=host_statistics64)  # fmt: skip
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: libc if name is None else real_cdll(name, *a, **k))
    monkeypatch.setattr(files, "_mach_host_port", None, raising=False)
    return taken


@pytest.fixture
def macos(monkeypatch, no_proc):
    """macOS: no ``SC_AVPHYS_PAGES``, no memory limit set."""
    monkeypatch.delenv(files.MEMORY_LIMIT_ENV, raising=False)
    real_sysconf = os.sysconf

    def sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real_sysconf(name)

    monkeypatch.setattr(os, "sysconf", sysconf)
    monkeypatch.setattr(sys, "platform", "darwin")


def test_on_macos_the_free_memory_is_the_free_and_inactive_pages(monkeypatch, macos):
    fake_macos_libc(monkeypatch, memsize=16 * GiB, page=16384, free=100_000, inactive=60_000)
    assert files.host_available_memory() == 160_000 * 16384  # 2.4 GiB
    with pytest.raises(ResourceError, match=r"but 2\.4 GiB is available"):
        files.check_memory_for(500 * GiB, "reading ct.nii.gz", "crop the volume")
    fake_macos_libc(monkeypatch, memsize=16 * GiB, page=16384, free=100_000, inactive=60_000, statistics_ok=False)
    assert files.host_available_memory() == 8 * GiB  # no page counts: half the physical memory
    fake_macos_libc(monkeypatch, memsize=4 * GiB, page=16384, free=1_000_000, inactive=1_000_000)
    assert files.host_available_memory() == 4 * GiB  # never more than the machine has


def test_on_macos_a_long_lived_process_takes_its_host_port_once(monkeypatch, macos):
    """Before: every measure took a new reference to the host port (mach_host_self) and none was given back, so
    Slicer's process, which measures for every run, gathered them without end."""
    taken = fake_macos_libc(monkeypatch, memsize=16 * GiB, page=16384, free=100_000, inactive=60_000)
    for _ in range(3):
        assert files.host_available_memory() == 160_000 * 16384
    assert taken == [7]


def test_where_the_free_memory_cannot_be_measured_the_log_says_so_once_and_names_the_variable(
        monkeypatch, no_proc, diffusioncore_log):  # fmt: skip
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    monkeypatch.setattr(files, "_UNMEASURED_MEMORY_SAID", False, raising=False)
    monkeypatch.delattr(os, "sysconf")
    monkeypatch.delattr(ctypes, "WinDLL", raising=False)  # GlobalMemoryStatusEx cannot be reached
    assert files.host_available_memory() == files.host_available_memory() == 1 << 62
    said = [r.getMessage() for r in diffusioncore_log if "could not be measured" in r.getMessage()]
    assert len(said) == 1 and "set DIFFUSIONCORE_MEMORY_LIMIT" in said[0], said


# -- D4: a network drive that numbers no inodes ---------------------------------------------------------------------
def _without_inode(st: os.stat_result) -> os.stat_result:
    fields = list(st[:10])
    fields[1] = 0  # st_ino
    extra = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize",
             "st_blocks", "st_rdev")  # fmt: skip
    return os.stat_result(fields, {k: getattr(st, k) for k in extra})


@pytest.fixture
def share(tmp_path, monkeypatch) -> Path:
    """A folder whose files report ``st_ino`` 0 to os.stat and os.lstat, as sshfs-win, WebDAV and some NAS drives do
    on Windows."""
    root = tmp_path / "share"
    root.mkdir()
    real_stat, real_lstat = os.stat, os.lstat

    def on_share(p) -> bool:
        return isinstance(p, str | os.PathLike) and os.path.abspath(os.fsdecode(p)).startswith(str(root))

    def stat(p, *a, **k):
        st = real_stat(p, *a, **k)
        return _without_inode(st) if on_share(p) else st

    def lstat(p, *a, **k):
        st = real_lstat(p, *a, **k)
        return _without_inode(st) if on_share(p) else st

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    assert os.stat(root).st_ino == 0
    return root


def test_a_batch_of_three_files_on_a_share_without_inode_numbers_writes_three_outputs_beside_them(share, capsys):
    """Before: "skipped case02: the same file as case01", 1 of 3 written, exit 0; with the output folder on the same
    share, the whole batch refused as "inside the input folder"."""
    src = share / "in"
    src.mkdir()
    for i in range(3):
        write_volume(thick_ct(seed=i), src / f"case0{i + 1}.nii.gz")
    out = share / "out"
    assert main(["sr", str(src), str(out), *FAST]) == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz"))
    assert written == ["case01.nii.gz", "case02.nii.gz", "case03.nii.gz"]
    assert "skipped" not in capsys.readouterr().err


def test_on_a_share_without_inode_numbers_an_input_is_still_protected_by_its_path(share):
    a, b = share / "a.nii.gz", share / "b.nii.gz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    (share / "sub").mkdir()
    (share / "link.nii.gz").symlink_to(a)
    files.refuse_overwriting_inputs([a], [("the output", b)])  # another file on the share: allowed
    for same in (share / "sub" / ".." / "a.nii.gz", share / "link.nii.gz"):
        with pytest.raises(OutputError, match="is the input"):
            files.refuse_overwriting_inputs([a], [("the output", same)])
    folder = share / "in"
    folder.mkdir()
    files.refuse_overwriting_inputs([folder], [("the output", share / "out" / "x.nii.gz")])
    with pytest.raises(OutputError, match="lies inside the input folder"):
        files.refuse_overwriting_inputs([folder], [("the output", folder / "x.nii.gz")])


class _EntryWithoutInode:
    """A ``DirEntry`` as Windows gives it: its ``stat()`` (from the folder listing) has ``st_ino`` 0."""

    def __init__(self, entry: os.DirEntry) -> None:
        self._entry, self.name, self.path = entry, entry.name, entry.path

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return _without_inode(self._entry.stat(follow_symlinks=follow_symlinks))


def test_on_windows_a_hard_link_to_a_file_of_a_folder_input_is_refused(tmp_path, monkeypatch):
    """Windows' folder listing numbers no inodes (DirEntry.stat), but os.stat does: before, the files of a DICOM
    folder input were known by their paths only, so an output elsewhere that is a hard link to one was written."""
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"slice")
    out = tmp_path / "out" / "IM0001.dcm"
    out.parent.mkdir()
    os.link(series / "IM0001.dcm", out)
    real_scandir = os.scandir

    @contextlib.contextmanager
    def scandir(path):
        with real_scandir(path) as entries:
            yield [_EntryWithoutInode(e) for e in entries]

    monkeypatch.setattr(files, "ON_WINDOWS", True)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OutputError, match=r"the output \S+out/IM0001\.dcm is the input \S+series/IM0001\.dcm \(the "
                                          r"same file under another name\)"):  # fmt: skip
        files.refuse_overwriting_inputs([series], [("the output", out)])
    files.refuse_overwriting_inputs([series], [("the output", tmp_path / "out" / "IM0002.dcm")])  # another file


def test_on_a_share_without_inode_numbers_a_batch_tells_its_files_apart_by_path(share):
    names = [share / f"case{i}.nii.gz" for i in range(3)]
    for p in names:
        p.write_bytes(p.name.encode())
    (share / "sub").mkdir()
    again = share / "sub" / ".." / "case1.nii.gz"
    kept, twice = batch.distinct_sources([*names, again])
    assert kept == names and twice == [(again, names[1])]


def test_on_a_share_without_inode_numbers_a_file_replaced_since_is_not_taken_for_the_one_published(share):
    """A failed batch input removes only the files it published itself: on the share (device, 0) matched any file
    at that name, so one another process put there since would have been deleted."""
    final = share / "out.nii.gz"
    with files.publish_journal() as journal:
        tmp = files.partial_file(final)
        Path(tmp).write_bytes(b"ours")
        files.publish(tmp, final)
    assert files.still_published(journal, final)
    replacement = share / "theirs.tmp"
    replacement.write_bytes(b"theirs, longer")
    os.utime(replacement, ns=(1_000_000_000, 1_000_000_000))
    os.replace(replacement, final)
    assert not files.still_published(journal, final)


# -- M3: Windows' 260-character limit on a path ---------------------------------------------------------------------
def _path_of_270_characters(tmp_path: Path) -> Path:
    folder = tmp_path / ("d" * 60)
    folder.mkdir()
    stem = 270 - len(str(folder)) - 1 - len(".nii.gz")
    assert 0 < stem <= 200, stem  # the name alone fits every file system
    out = folder / ("o" * stem + ".nii.gz")
    assert len(str(out)) == 270
    return out


def test_on_windows_a_path_over_259_characters_is_refused_unless_long_paths_are_on(tmp_path, monkeypatch):
    out = _path_of_270_characters(tmp_path)
    files.check_name_length(out)  # Linux takes 4096 bytes
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    with pytest.raises(OutputError, match=r"its path is too long for the file system \(270 characters, 303 with the "
                                          r"temporary file written beside it first; a path there may have at most "
                                          r"259\): use a shorter name or folder"):  # fmt: skip
        files.check_name_length(out)
    monkeypatch.setattr(files, "_windows_long_paths", lambda: True)  # LongPathsEnabled = 1
    files.check_name_length(out)


def test_on_windows_an_output_path_is_refused_from_226_characters_and_the_message_says_why(tmp_path, monkeypatch):
    """The temporary file written beside the output has a name 33 characters longer: before, a path of 240
    characters was refused as "273 characters", a figure the user could not find."""
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    folder = tmp_path / ("d" * 40)
    folder.mkdir()
    stem = 226 - len(str(folder)) - 1 - len(".nii.gz")
    files.check_name_length(folder / ("o" * stem + ".nii.gz"))  # 226 + 33 = 259: the temporary file fits
    refused = folder / ("o" * (stem + 1) + ".nii.gz")
    assert len(str(refused)) == 227
    with pytest.raises(OutputError, match=r"\(227 characters, 260 with the temporary file written beside it first; a "
                                          r"path there may have at most 259\)"):  # fmt: skip
        files.check_name_length(refused)


def test_on_windows_a_name_is_counted_in_characters_as_ntfs_counts_it(tmp_path, monkeypatch):
    """NTFS takes 255 UTF-16 units in a name: before, a name of 80 CJK characters (240 bytes in UTF-8) was refused
    on Windows as too long."""
    cjk = tmp_path / ("\u4e2d" * 80 + ".nii.gz")
    with pytest.raises(OutputError, match=r"its name is too long for the file system \(247 bytes, 280 with"):
        files.check_name_length(cjk)  # Linux: ext4 takes 255 bytes
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    files.check_name_length(cjk)
    with pytest.raises(OutputError, match=r"its name is too long for the file system \(230 characters, 263 with the "
                                          r"temporary file written beside it first; a name there may have at most "
                                          r"255\)"):  # fmt: skip
        files.check_name_length(tmp_path / ("\u4e2d" * 223 + ".nii.gz"))


def fake_long_paths(monkeypatch, *, setting: int, process: int | None) -> None:
    """Windows' answers on long paths: the system setting ``LongPathsEnabled`` (winreg), and this process's
    ``RtlAreLongPathsEnabled`` (ntdll), ``None`` where ntdll has no such call (before Windows 10 1607)."""
    calls = {} if process is None else {"RtlAreLongPathsEnabled": lambda: process}
    monkeypatch.setattr(ctypes, "WinDLL", lambda name: {"ntdll": types.SimpleNamespace(**calls)}[name],
                        raising=False)  # fmt: skip
    winreg = types.SimpleNamespace(HKEY_LOCAL_MACHINE=0x80000002,
                                   OpenKey=lambda root, key: contextlib.nullcontext(key),
                                   QueryValueEx=lambda key, name: (setting, 4))  # fmt: skip
    monkeypatch.setitem(sys.modules, "winreg", winreg)


def test_on_windows_long_paths_are_taken_only_where_this_process_may_use_them(tmp_path, monkeypatch):
    """LongPathsEnabled = 1 lifts the limit only for an executable that declares itself long-path aware (Slicer's may
    not): before, such a path passed the check, and the write failed after the work with "cannot find the path"."""
    out = _path_of_270_characters(tmp_path)
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    fake_long_paths(monkeypatch, setting=1, process=0)
    with pytest.raises(OutputError, match=r"a path there may have at most 259"):
        files.check_name_length(out)
    fake_long_paths(monkeypatch, setting=1, process=1)
    files.check_name_length(out)
    fake_long_paths(monkeypatch, setting=1, process=None)  # before Windows 10 1607: the setting alone
    files.check_name_length(out)
    fake_long_paths(monkeypatch, setting=0, process=None)
    with pytest.raises(OutputError, match=r"a path there may have at most 259"):
        files.check_name_length(out)


def test_on_windows_sr_refuses_an_output_path_of_270_characters_before_any_work(tmp_path, monkeypatch, capsys):
    src = write_volume(thick_ct(), tmp_path / "ct.nii.gz")
    out = _path_of_270_characters(tmp_path)
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    assert main(["sr", str(src), str(out), *FAST]) == 4
    err = capsys.readouterr().err
    assert "its path is too long for the file system" in err and "at most 259" in err, err
    assert os.listdir(out.parent) == []


def test_windows_errors_for_a_path_too_long_are_said_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    exc = FileNotFoundError(2, "The filename or extension is too long")
    exc.winerror = 206  # ERROR_FILENAME_EXCED_RANGE
    short = tmp_path / "out.nii.gz"
    assert "too long for the file system" in str(files.too_long_error(short, exc))
    exc = FileNotFoundError(2, "The system cannot find the path specified")
    exc.winerror = 3  # ERROR_PATH_NOT_FOUND: a path over MAX_PATH, or a folder that does not exist
    assert "at most 259" in str(files.too_long_error(_path_of_270_characters(tmp_path), exc))
    assert files.too_long_error(tmp_path / "missing" / "out.nii.gz", exc) is None


# -- M4: outputs that differ only in letter case on macOS -----------------------------------------------------------
def test_on_macos_outputs_that_differ_only_in_case_are_one_file(tmp_path, monkeypatch):
    outputs = [("the output", tmp_path / "CaseA.nii.gz"), ("the provenance sidecar", tmp_path / "CaseA.json"),
               ("--report", tmp_path / "casea.json")]  # fmt: skip
    files.refuse_overwriting_inputs([], outputs)  # Linux: three files
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(OutputError, match=r"--report \S+casea\.json and the provenance sidecar \S+CaseA\.json are the "
                                          r"same file: give them different names"):
        files.refuse_overwriting_inputs([], outputs)


# -- M6: inputs of one name on two Windows drives -------------------------------------------------------------------
def test_a_batch_with_inputs_of_one_name_on_two_drives_names_them_by_their_paths(monkeypatch):
    """Before: "internal error (ValueError: Paths don't have the same drive)"."""
    windows_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    windows_os.path = ntpath
    monkeypatch.setattr(batch, "os", windows_os)
    monkeypatch.setattr(batch, "Path", pathlib.PureWindowsPath)
    monkeypatch.setattr(pathlib.PureWindowsPath, "is_dir", lambda self: False, raising=False)
    sources = [pathlib.PureWindowsPath(p) for p in (r"C:\scans\case01.nii.gz", r"D:\export\case01.nii.gz",
                                                      r"\\pacs\share\case01.nii.gz", r"C:\scans\case02.nii.gz")]  # fmt: skip
    names = batch.batch_output_names(sources)
    assert names == batch.batch_output_names(sources)  # the same inputs, the same names
    assert len({n.casefold() for n in names}) == 4 and names[3] == "case02.nii.gz"
    assert all(n.startswith("case01~") and n.endswith(".nii.gz") for n in names[:3]), names


# -- Doc1: the cache folder on Windows ------------------------------------------------------------------------------
def test_on_windows_the_cache_is_under_localappdata_for_the_engine_and_the_slicer_panels(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
    try:
        from CTDiffusionSRLib.weights_choice import user_registry_path
    finally:
        sys.path.remove(str(ROOT / "CTDiffusionSR"))
    from DiffusionCore.weights.registry import user_registry_path as engine_registry_path

    monkeypatch.delenv(files.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no cache of an earlier version there
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert files.cache_dir() == tmp_path / "home" / ".cache" / "diffusioncore"  # Linux (and macOS): unchanged
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    expected = tmp_path / "Local" / "diffusioncore"
    assert files.cache_dir() == expected
    assert user_registry_path() == engine_registry_path() == expected / "weights" / "registry.json"
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "mine"))  # the variable still decides
    assert files.cache_dir() == tmp_path / "mine"
    assert user_registry_path() == tmp_path / "mine" / "weights" / "registry.json"


def test_on_windows_a_cache_made_by_an_earlier_version_under_the_home_folder_stays_in_use(tmp_path, monkeypatch):
    """Its imported weights and samples would otherwise vanish from the lists after an update."""
    monkeypatch.delenv(files.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    monkeypatch.setattr(files, "ON_WINDOWS", True)
    earlier = tmp_path / "home" / ".cache" / "diffusioncore"
    earlier.mkdir(parents=True)
    assert files.cache_dir() == earlier
    (tmp_path / "Local" / "diffusioncore").mkdir(parents=True)
    assert files.cache_dir() == tmp_path / "Local" / "diffusioncore"


def test_a_windows_path_too_long_from_any_library_is_said_as_such(capsys):
    """A library's own OSError for a path over Windows' limit (winerror 206) is the user's to correct, not a bug."""
    from DiffusionCore.cli.common import run_guarded

    def too_long():
        exc = OSError(2, "The filename or extension is too long")
        exc.winerror = 206  # what Windows sets on the OSError it raises
        exc.filename = "C:\\scans\\" + "a" * 260 + ".nii.gz"
        raise exc

    assert run_guarded(too_long) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the path C:\\scans\\aaa") and "(276 characters) is too long for Windows" in err
    assert "at most 259 characters unless long paths are turned on" in err and "internal error" not in err
