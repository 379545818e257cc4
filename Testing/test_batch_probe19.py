"""Batches of `sr FOLDER OUT` as a researcher runs them overnight (probe 19): one volume's failure (over the memory
budget, not writable) is that volume's, named one per line in the closing lines and in --report as {volume, why},
and the batch goes on; a full disk stops it with the report still written; a stopped or partly failed batch continues
with --skip-existing under the same names; SIGTERM / Ctrl-C say what was written; torchrun's processes finish their
shares and agree on one exit code; name clashes are told apart instead of refusing the batch; exit 7 tells "some
failed, the others written" from 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_sr_pipeline import thick_ct

from DiffusionCore.cli.batch import MAX_NAME_BYTES, batch_output_names
from DiffusionCore.cli.main import main
from DiffusionCore.errors import OutputError
from DiffusionCore.volume import Volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--tiny-test-model", "--no-adapt", "--progress", "none", "--factor", "2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sr_command(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "sr", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=180, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, **kw)  # fmt: skip


def lines(err: str, start: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(start)]


def write_itk(vol: Volume, path: Path) -> None:
    """Write as another program does (.mhd with its .raw; a name too long for our writer's temporary file)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing)
    sitk.WriteImage(img, str(path))


def folder_of(tmp_path: Path, names: dict[str, tuple[int, int, int]]) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i, (name, shape) in enumerate(names.items()):
        if shape == (0, 0, 0):
            (src / name).write_bytes(b"")  # an empty file: unreadable
        else:
            write_volume(thick_ct(shape=shape, seed=i), src / name)
    return src


def test_a_volume_over_the_memory_budget_fails_alone_and_the_report_names_it(tmp_path, capsys):
    """D1: a ResourceError of one volume ended the batch (c never tried) and --report was never written. D10: exit 7,
    not 2; a closing line; each failure on a line of its own; failed as {volume, why}."""
    src = folder_of(tmp_path, {"a.nii.gz": (2, 12, 12), "b_big.nii.gz": (4, 128, 128), "c.nii.gz": (3, 12, 12)})
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = main(["sr", str(src), str(out), *FAST, "--memory-limit", "4MiB", "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 7, err
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz", "c.json", "c.nii.gz"]
    data = json.loads(report.read_text(encoding="utf-8"))
    assert [v["output"] for v in data["volumes"]] == [str(out / "a.nii.gz"), str(out / "c.nii.gz")]
    assert len(data["failed"]) == 1 and data["failed"][0]["volume"] == str(src / "b_big.nii.gz")
    assert "not enough memory" in data["failed"][0]["why"]
    assert data["summary"]["written"] == 2 and data["summary"]["failed"] == 1
    assert f"info: 2 of 3 volume(s) written to {out} in " in err and "1 failed, listed below" in err
    [failed] = lines(err, "warning: failed: ")  # one line per failure
    assert failed.startswith(f"warning: failed: {src / 'b_big.nii.gz'}: not enough memory")
    [error] = lines(err, "error:")
    assert error.startswith("error: 1 of 3 volumes failed") and str(report) in error and "--skip-existing" in error
    assert len(error) < 400  # not every failure's text in one line


def test_a_full_disk_stops_the_batch_and_the_report_says_what_was_and_was_not_done(tmp_path, small_disk, capsys):
    """D1: on a full disk the batch stopped with exit 4 and no report. Stopping is right there, but the report (on
    another disk) is written, and the message counts what was written, what failed and what was not tried."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # noise does not compress: about 14 KiB each on a 64 KiB disk
        write_volume(Volume(rng.normal(0, 300, (3, 24, 24)).astype(np.float32), (0.8, 0.8, 4.0)), src / f"v{i}.nii.gz")
    report = tmp_path / "report.json"
    rc = main(["sr", str(src), str(small_disk / "out"), *FAST, "--allow-non-ct", "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 4, err
    [error] = lines(err, "error:")
    assert error.startswith("error: the batch stopped after ") and "the disk is full" in error
    assert "not tried" in error and "--skip-existing" in error
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["stopped"].startswith("the disk is full") and len(data["failed"]) == 1
    assert len(data["volumes"]) >= 1 and len(data["not_tried"]) >= 1
    assert len(data["volumes"]) + len(data["failed"]) + len(data["not_tried"]) == 8
    written = sorted(p for p in os.listdir(small_disk / "out") if p.endswith(".nii.gz"))
    assert written == sorted(Path(v["output"]).name for v in data["volumes"])  # no partial output is left
    assert [p for p in os.listdir(small_disk / "out") if "partial" in p] == []


def test_a_write_failure_of_one_volume_is_that_volumes_and_leaves_no_half_output(tmp_path, capsys, monkeypatch):
    """D1: a write failure (here the provenance sidecar of b) fails b alone: the batch goes on, and b's volume file,
    written before its sidecar failed, is removed (a result without its sidecar is no finished output)."""
    import DiffusionCore.results as results

    src = folder_of(tmp_path, {"a.nii.gz": (2, 12, 12), "b.nii.gz": (2, 12, 12), "c.nii.gz": (2, 12, 12)})
    real = results.write_json_atomic

    def failing_sidecar(data, path, **kw):
        if Path(path).name == "b.json":
            raise OutputError(f"cannot write {path}: Permission denied")
        return real(data, path, **kw)

    monkeypatch.setattr(results, "write_json_atomic", failing_sidecar)
    rc = main(["sr", str(src), str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert rc == 7, err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json", "a.nii.gz", "c.json", "c.nii.gz"]
    assert lines(err, "warning: failed: ") == [f"warning: failed: {src / 'b.nii.gz'}: cannot write "
                                               f"{tmp_path / 'out' / 'b.json'}: Permission denied"]  # fmt: skip


def test_a_partly_failed_batch_continues_with_skip_existing_under_the_same_names(tmp_path):
    """D3, D9: the same command again was refused at the first existing output (only --overwrite went on, recomputing
    everything). --skip-existing leaves what is done (reported as skipped, not failed) and does the rest; the names
    are those of the first run, the prefixes of same-named inputs included."""
    src = folder_of(tmp_path, {"a.nii.gz": (2, 12, 12), "bad.nii.gz": (0, 0, 0)})
    for sub in ("sub1", "sub2"):
        (src / sub).mkdir()
        write_volume(thick_ct(shape=(2, 12, 12)), src / sub / "case.nii.gz")
    out, report = tmp_path / "out", tmp_path / "r.json"
    args = (str(src), str(out), *FAST, "--report", str(report))
    first = sr_command(*args)
    assert first.returncode == 7, first.stderr
    names = sorted(os.listdir(out))
    assert names == ["a.json", "a.nii.gz", "sub1_case.json", "sub1_case.nii.gz", "sub2_case.json", "sub2_case.nii.gz"]
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}

    again = sr_command(*args)  # without the option: refused, pointing to it
    assert again.returncode == 4 and "pass --skip-existing to keep it" in again.stderr, again.stderr

    write_volume(thick_ct(shape=(2, 12, 12), seed=5), src / "bad.nii.gz", overwrite=True)  # the failed input fixed
    done = sr_command(*args, "--skip-existing")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == sorted([*names, "bad.json", "bad.nii.gz"])
    assert {n: (out / n).stat().st_mtime_ns for n in names} == stamps  # left as they were
    data = json.loads(report.read_text(encoding="utf-8"))
    # the first run's entries are carried over (a continued batch's report covers the whole batch), in input order
    assert [(v["input"], v.get("from_earlier_run", False)) for v in data["volumes"]] == [
        (str(src / "a.nii.gz"), True), (str(src / "bad.nii.gz"), False), (str(src / "sub1" / "case.nii.gz"), True),
        (str(src / "sub2" / "case.nii.gz"), True)] and data["failed"] == []  # fmt: skip
    assert data["summary"]["written"] == 1 and data["summary"]["skipped"] == 3
    assert sorted(s["volume"] for s in data["skipped"]) == sorted(
        str(p) for p in (src / "a.nii.gz", src / "sub1" / "case.nii.gz", src / "sub2" / "case.nii.gz"))
    assert "written to" in done.stderr and "3 skipped (3 done before)" in done.stderr

    (out / "a.json").unlink()  # a result without its provenance sidecar is not one this command finished
    partial = sr_command(*args, "--skip-existing")
    assert partial.returncode == 4 and f"{out / 'a.nii.gz'} exists without {out / 'a.json'}" in partial.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_batch_says_what_was_written_writes_its_report_and_continues(tmp_path, sig):
    """D4: SIGTERM after some volumes said "no output was written" (they were, complete) and wrote no report. A volume
    that failed before the stop is listed on its own line, as at the end of a whole batch."""
    src = folder_of(tmp_path, {"a.nii.gz": (2, 12, 12), "a_bad.nii.gz": (0, 0, 0), "b.nii.gz": (8, 64, 64),
                               "c.nii.gz": (8, 64, 64)})  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "DiffusionCore", "sr", str(src), str(out), "--tiny-test-model", "--no-adapt",
           "--factor", "4", "--use-patches", "--patch-size", "8", "32", "32", "--progress", "none", "--report",
           str(report)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            encoding="utf-8", env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # Ctrl-C as in a terminal: a run started in the background of a script inherits SIGINT
                            # ignored (and Python then installs no handler for it), as CI's shells may start the tests
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    seen = []
    for line in proc.stderr:  # wait until a is written
        seen.append(line)
        if "a.nii.gz -> " in line:
            break
        assert time.time() < deadline, seen
    time.sleep(0.3)  # b is being worked on
    proc.send_signal(sig)
    err = "".join(seen) + proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, err
    [error] = lines(err, "error:")
    assert "after 2 of 4 volume(s): 1 written to " in error and "--skip-existing" in error and str(report) in error
    assert "no output was written" not in error
    [failed] = lines(err, "warning: failed:")
    assert str(src / "a_bad.nii.gz") in failed
    data = json.loads(report.read_text(encoding="utf-8"))
    assert len(data["volumes"]) == 1 and [v["volume"] for v in data["not_tried"]] == [str(src / "b.nii.gz"),
                                                                                        str(src / "c.nii.gz")]  # fmt: skip
    assert [v["volume"] for v in data["failed"]] == [str(src / "a_bad.nii.gz")]
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz"]


def test_under_torchrun_every_process_finishes_its_share_and_all_exit_alike(tmp_path):
    """D2: the process whose share failed exited at once (with "the others were written" although it wrote none),
    and torchrun then stopped the other mid-work: its good volumes were never written."""
    src = folder_of(tmp_path, {"a.nii.gz": (4, 48, 48), "b_bad.nii.gz": (0, 0, 0), "c.nii.gz": (4, 48, 48),
                               "d_bad.nii.gz": (0, 0, 0)})  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "DiffusionCore",
         "sr", str(src), str(out), *FAST, "--report", str(report)],
        capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    err = r.stderr
    # each process said the same verdict after both had done their shares (torchrun may then stop the slower one
    # while it tears down: its work and report are done by then)
    assert "exitcode  : 7" in err and "was stopped by signal" not in err, err[-3000:]
    assert sorted(os.listdir(out)) == ["a.json", "a.nii.gz", "c.json", "c.nii.gz"]  # process 0's share, whole
    assert "process 1 of 2: 0 of 2 volume(s) written to" in err and "the others were written" not in err
    assert err.count("error: 2 of 4 volumes failed") == 2  # one verdict, over the whole batch, from each process
    rank = [json.loads((tmp_path / f"r.rank{k}.json").read_text(encoding="utf-8")) for k in (0, 1)]
    assert len(rank[0]["volumes"]) == 2 and [f["volume"] for f in rank[1]["failed"]] == [
        str(src / "b_bad.nii.gz"), str(src / "d_bad.nii.gz")]  # fmt: skip


def test_clashing_names_are_told_apart_and_one_file_twice_is_done_once(tmp_path, capsys):
    """D7: x.nii + x.nii.gz (one x.json sidecar), e.mhd + e.mha, a DICOM folder s/ + s.nii.gz, and one file listed
    twice through `..` each refused the whole batch, without naming the inputs."""
    from conftest import write_dicom_series

    src = folder_of(tmp_path, {"x.nii": (2, 12, 12), "x.nii.gz": (2, 12, 12), "e.mha": (2, 12, 12),
                               "s.nii.gz": (2, 12, 12)})  # fmt: skip
    write_itk(thick_ct(shape=(2, 12, 12)), src / "e.mhd")  # with its e.raw
    write_dicom_series(src / "s", thick_ct(shape=(3, 12, 12)))
    (src / "sub").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(p) for p in sorted(src.iterdir()) if p.suffix != ".raw" and p.name != "sub"]
                                 + [str(src / "sub" / ".." / "x.nii")]) + "\n", encoding="utf-8")  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "r.json"
    rc = main(["sr", str(listing), str(out), *FAST, "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "info: 6 of 7 volume(s) written to " in err and "; 1 skipped (1 named twice)" in err
    assert sorted(p for p in os.listdir(out) if not p.endswith(".json")) == [
        "e_mha.mha", "e_mhd.mha", "s_dicom.nii.gz", "s_nii_gz.nii.gz", "x_nii.nii", "x_nii_gz.nii.gz"]
    assert {"x_nii.json", "x_nii_gz.json"} <= set(os.listdir(out))  # a sidecar each
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["skipped"] == [{"volume": str(src / "sub" / ".." / "x.nii"),
                                "why": f"the same file as {src / 'x.nii'}: done once"}]  # fmt: skip
    # the rule is the inputs' alone: the same inputs in another order give each the same name
    sources = [src / "x.nii", src / "x.nii.gz", src / "s", src / "s.nii.gz"]
    assert batch_output_names(sources[::-1]) == batch_output_names(sources)[::-1]


def test_names_that_differ_only_in_case_are_told_apart_by_a_hash_of_their_path(tmp_path, capsys):
    """Two names of one stem whatever the case (CT, ct) would be one file on a case-insensitive disk, and their
    suffix tags are the same too: each then ends in ~ and a hash of its path, the same in every run (probe 23: a.png,
    a.jpg and a_png.png gave one name twice and refused the whole batch)."""
    src = folder_of(tmp_path, {"CT.nii.gz": (2, 12, 12), "ct.nii.gz": (2, 12, 12)})
    names = batch_output_names([src / "CT.nii.gz", src / "ct.nii.gz"])
    assert len({n.casefold() for n in names}) == 2 and all(n.endswith(".nii.gz") and "~" in n for n in names)
    assert batch_output_names([src / "ct.nii.gz", src / "CT.nii.gz"]) == names[::-1]  # a function of each path
    assert main(["sr", str(src), str(tmp_path / "out"), *FAST]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == sorted(names)


def test_a_folder_prefix_that_makes_a_name_too_long_is_cut_the_same_way_each_time(tmp_path, capsys):
    """D8: two 244-character names in two folders: the prefixed names were too long for the disk (an internal error,
    ENAMETOOLONG) and an empty output folder stayed behind."""
    long = "x" * 240 + ".mha"
    for sub in ("patient_folder_one", "patient_folder_two"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        write_itk(thick_ct(shape=(2, 12, 12)), tmp_path / "in" / sub / long)
    out = tmp_path / "out"
    assert main(["sr", str(tmp_path / "in"), str(out), *FAST]) == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    assert len(names) == 2 and all(len(n.encode()) <= MAX_NAME_BYTES and n.endswith(".mha") for n in names)
    assert names[0].startswith("patient_folder_one_xxx") and names[1].startswith("patient_folder_two_xxx")
    assert main(["sr", str(tmp_path / "in"), str(out), *FAST, "--skip-existing"]) == 0  # the same names again
    assert "2 skipped (2 done before)" in capsys.readouterr().err and sorted(os.listdir(out)) == names


def test_batch_warnings_name_their_volume_and_the_provenance_names_the_input_file(tmp_path):
    """D10: a pipeline warning in a batch did not say which volume it was about; the provenance recorded the input
    as typed (relative), so the link broke once the output was read from elsewhere. It names the input's file (and
    its sha256), never the folders it lies in: a result travels; only --report keeps the path."""
    src = tmp_path / "in"
    src.mkdir()
    write_volume(Volume(thick_ct(shape=(3, 16, 16)).array, (0.6, 0.6, 0.6)), src / "thin.nii.gz")
    write_volume(thick_ct(shape=(2, 16, 16)), src / "thick.nii.gz")
    r = sr_command("in", "out", "--tiny-test-model", "--no-adapt", "--progress", "none", "--factor", "4", "--axis",
                   "z", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    finer = [line for line in lines(r.stderr, "warning:") if "finer than" in line]
    assert finer and finer[0].startswith("warning: in/thin.nii.gz: the result's slices will be")
    assert lines(r.stderr, "info: 2 of 2 volume(s) written to out in ")
    sidecar = json.loads((tmp_path / "out" / "thick.json").read_text(encoding="utf-8"))
    assert sidecar["provenance"]["input"] == "thick.nii.gz" and len(sidecar["provenance"]["input_sha256"]) == 64


def test_several_inputs_are_refused_naming_the_extra_input_not_the_output(tmp_path, capsys):
    """D12: `sr a b OUTDIR` said "unrecognized arguments: OUTDIR", blaming the output folder."""
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    rc = main(["sr", str(a), str(b), str(tmp_path / "outdir"), *FAST])
    [error] = lines(capsys.readouterr().err, "error:")
    assert rc == 2 and "sr takes one INPUT and one OUTPUT, and got 3 paths" in error and "list file" in error
    assert "unrecognized" not in error and not (tmp_path / "outdir").exists()


def test_uncertainty_into_the_output_folder_advises_another_folder(tmp_path, capsys):
    """D12: in a batch the user cannot name the maps, so "give them different names" was no advice."""
    src = folder_of(tmp_path, {"a.nii.gz": (2, 12, 12), "b.nii.gz": (2, 12, 12)})
    out = tmp_path / "out"
    rc = main(["sr", str(src), str(out), *FAST, "--num-samples", "2", "--uncertainty", str(out)])
    [error] = lines(capsys.readouterr().err, "error:")
    assert rc == 4 and "give --uncertainty another folder" in error and not out.exists()


def test_help_says_the_naming_rule_the_continue_option_the_batch_format_and_exit_7(capsys):
    assert main(["sr", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--skip-existing", "sub1_case.nii.gz", "x_nii_gz.nii.gz", "The same INPUT gives the same names",
                 "In a batch auto writes a .nii.gz file for every input, DICOM ones too", "7 some failed"):
        assert part in text, part
    assert main(["--help"]) == 0
    assert "7 a batch in which some volumes failed and the others were written" in " ".join(
        capsys.readouterr().out.split())


def test_exit_codes_of_a_batch_tell_partial_from_none(tmp_path, capsys):
    """D10: 2 both for "some volumes written" and "nothing done"; now 7 and 2."""
    src = folder_of(tmp_path, {"bad.nii.gz": (0, 0, 0), "bad2.nii.gz": (0, 0, 0)})
    assert main(["sr", str(src), str(tmp_path / "out"), *FAST]) == 2
    assert lines(capsys.readouterr().err, "error:")[0].startswith("error: all 2 volumes failed, nothing was written")


LEAVE_CHECK = '''
import os, sys
from DiffusionCore.cli.batch import ProcessGroup
from DiffusionCore.devices import process_info

group = ProcessGroup(process_info("cpu"))
assert group.joined
group.reduce([1, 2])
import torch.distributed.nn  # what building a model on the meta device imports, mid-batch
group.reduce([3])
group.leave()
left = [n for n in (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        if "gloo" in n]
with open(os.path.join(os.environ["LEAVE_CHECK_DIR"], f"rank{os.environ['RANK']}.txt"), "w") as f:
    f.write(repr(left))  # a file per process: their prints to one stdout interleave
sys.exit(3 if left else 0)
'''


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc (Linux)")
def test_under_torchrun_the_group_and_its_threads_are_gone_when_a_process_leaves(tmp_path):
    """Probe 23: xray2ct under torchrun aborted after its work in a third of the runs ("terminate called without an
    active exception", exit -6): torch.distributed.nn, imported mid-batch, bound the group in its functions' defaults,
    so destroying it left its Gloo threads running into Python's exit."""
    script = tmp_path / "leave_check.py"
    script.write_text(LEAVE_CHECK, encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)],
        capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LEAVE_CHECK_DIR": str(tmp_path)},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [(tmp_path / f"rank{k}.txt").read_text(encoding="utf-8") for k in (0, 1)] == ["[]", "[]"]


def test_skip_existing_keeps_only_outputs_made_with_this_runs_weights_and_settings(tmp_path, capsys):
    """--skip-existing kept a volume's output whatever it had been made with: a batch run again with another factor,
    seed, adaptation or weights into the same folder mixed two settings without a word. Now an output whose provenance
    records other weights or settings is refused before any work, naming each difference; the same command keeps
    it."""
    from DiffusionCore.sr.throughplane import tiny_predictor
    from DiffusionCore.sr.throughplane_train import export_predictor

    weights = {}
    for seed in (0, 1):
        weights[seed] = tmp_path / f"w{seed}.safetensors"
        export_predictor(tiny_predictor(seed), weights[seed], {})
    src = folder_of(tmp_path, {"a.nii.gz": (4, 40, 40), "b.nii.gz": (4, 40, 40)})  # big enough to adapt
    out = tmp_path / "out"

    def sr(*extra: str, factor: str = "2", adapt: tuple[str, ...] = ("--adapt-steps", "2"), w: int = 0) -> tuple[int, str]:
        code = main(["sr", str(src), str(out), "--progress", "none", "--weights", str(weights[w]),
                     "--allow-unregistered-weights", "--factor", factor, *adapt, *extra])  # fmt: skip
        return code, capsys.readouterr().err

    assert sr()[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, err = sr("--skip-existing")
    assert code == 0 and "2 skipped (2 done before)" in err
    refused = {
        "--factor: 2 (this run: 4)": sr("--skip-existing", factor="4"),
        "--seed: 0 (this run: 5)": sr("--skip-existing", "--seed", "5"),
        "adaptation (--adapt, --adapt-steps, --no-adapt): steps 2, steps_run 2 (this run: none)": sr("--skip-existing",
                                                                                        adapt=("--no-adapt",)),
        "adaptation (--adapt, --adapt-steps, --no-adapt): steps 2, steps_run 2 (this run: steps 400)": sr("--skip-existing", adapt=()),
        "data consistency (--no-data-consistency): on (this run: off)": sr("--skip-existing", "--no-data-consistency"),
        f"weights {weights[0]} (sha256 ": sr("--skip-existing", w=1),
    }  # fmt: skip
    for difference, (code, err) in refused.items():
        [error] = lines(err, "error:")
        assert code == 4 and f"{out / 'a.nii.gz'} exists but was made with other settings than this run's" in error
        assert difference in error and "--overwrite to redo every input" in error, error
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing was redone or removed


def test_skip_existing_keeps_outputs_after_the_input_folder_was_moved(tmp_path, capsys):
    """Probe 26: a batch continued after its input folder was moved or renamed was refused with "inputs added or
    removed since the first run (a second file of the same name) changed them". An input recorded at a path that is
    gone, with the name of the input now named, is that input."""
    src = folder_of(tmp_path, {"a.nii.gz": (2, 12, 12), "b.nii.gz": (2, 12, 12)})
    out = tmp_path / "out"
    assert main(["sr", str(src), str(out), *FAST]) == 0
    moved = src.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["sr", str(moved), str(out), *FAST, "--skip-existing"]) == 0
    assert "2 skipped (2 done before)" in capsys.readouterr().err
    side = json.loads((out / "a.json").read_text(encoding="utf-8"))  # made from another file, gone too
    side["provenance"]["input"] = str(tmp_path / "gone" / "other.nii.gz")
    (out / "a.json").write_text(json.dumps(side), encoding="utf-8")
    assert main(["sr", str(moved), str(out), *FAST, "--skip-existing"]) == 4  # where names differ it is refused
    assert f"exists but was made from {tmp_path / 'gone' / 'other.nii.gz'}" in capsys.readouterr().err
