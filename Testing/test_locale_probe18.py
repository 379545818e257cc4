"""Other locales and text files made by other tools (probe 18): a C locale without UTF-8 mode, cp1252 and ASCII
consoles, list files, configs and the weights registry as Windows editors save them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from DiffusionCore.config import load_config, read_config_file
from DiffusionCore.errors import ConfigError, InputError, WeightsError
from DiffusionCore.inputs import collect_volumes
from DiffusionCore.volume import write_volume
from DiffusionCore.weights import registry

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m DiffusionCore ARGS`` with ``env`` added; stdout and stderr read back as UTF-8 with escapes
    for what is not (a C locale writes the bytes it could not decode as they were)."""
    return subprocess.run(
        [sys.executable, "-m", "DiffusionCore", *args],
        cwd=cwd,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **env},
        encoding="utf-8",
        errors="backslashreplace",
    )


def error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


#: A C locale with Python's UTF-8 mode off: argv and file names hold non-ASCII bytes as lone surrogates.
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


@pytest.fixture
def small_ct(tmp_path, make_phantom) -> Path:
    return write_volume(make_phantom(shape=(12, 16, 16), spacing=(0.8, 0.8, 1.0)), tmp_path / "small.nii.gz")


# -- 1: a C locale without UTF-8 mode -----------------------------------------------------------------------------
def test_undecodable_argument_is_refused_with_an_error_line_not_an_abort(tmp_path, make_phantom):
    folder = tmp_path / "中文"
    folder.mkdir()
    src = write_volume(make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 2.0)), folder / "thick_中文.nii.gz")
    proc = run_cli("sr", str(src), str(tmp_path / "sr_é.nii.gz"), "--factor", "2", "--no-adapt", "--progress",
                   "none", cwd=tmp_path, **C_LOCALE)  # fmt: skip
    line = error_line(proc, 2)  # before: SIGABRT (134) inside SimpleITK, no error line
    assert "PYTHONUTF8=1" in line and "LANG=C.UTF-8" in line
    assert "thick_" in line  # the argument is named
    assert [p.name for p in tmp_path.iterdir()] == ["中文"]  # nothing written


def test_file_names_found_on_disk_reach_itk_under_a_c_locale(tmp_path, small_ct):
    """A folder scanned under the C locale gives names with lone surrogates; ITK gets their UTF-8 text."""
    (tmp_path / "thick_中文.nii.gz").write_bytes(small_ct.read_bytes())
    small_ct.unlink()
    script = (
        "import os\n"
        "from DiffusionCore.volume import read_volume, write_volume\n"
        "name = next(n for n in os.listdir('.') if n.startswith('thick_'))\n"
        "vol = read_volume(name)\n"
        "write_volume(vol, 'copy_' + name)\n"
        "print(vol.array.shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, timeout=120,
                          env={**os.environ, **C_LOCALE}, encoding="utf-8", errors="backslashreplace")  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # before: 134, "basic_string::_S_construct null not valid"
    assert (tmp_path / "copy_thick_中文.nii.gz").is_file()


def test_sr_batch_of_a_folder_with_non_ascii_names_under_a_c_locale(tmp_path, make_phantom):
    """The names come from the folder, not argv: they hold lone surrogates and reach ITK (reading, writing, the
    header's provenance) as their UTF-8 text."""
    (tmp_path / "batch").mkdir()
    write_volume(make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 2.0)), tmp_path / "batch" / "thick_中文.nii.gz")
    proc = run_cli("sr", "batch", "out", "--factor", "2", "--no-adapt", "--progress", "none", cwd=tmp_path,
                   **C_LOCALE)  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # before: SIGABRT (134) inside SimpleITK
    assert (tmp_path / "out" / "thick_中文.nii.gz").is_file()


def test_header_text_with_undecoded_bytes_is_written_as_utf8(tmp_path, make_phantom):
    import SimpleITK as sitk

    name = "thick_\udce4\udcb8\udcad.nii.gz"  # a file name found on disk under a C locale
    out = write_volume(make_phantom(shape=(4, 8, 8)), tmp_path / "v.nrrd", header={"ctdiffusion_input": name})
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    reader.ReadImageInformation()
    assert reader.GetMetaData("ctdiffusion_input") == "thick_中.nii.gz"


def test_itk_path_decodes_utf8_bytes_and_refuses_others(monkeypatch):
    from DiffusionCore.volume import itk_path

    assert itk_path("plain/é.nii.gz") == "plain/é.nii.gz"
    assert itk_path(os.fsdecode("thick_中文.nii.gz".encode())) == "thick_中文.nii.gz"
    latin1 = b"thick_\xe9.nii.gz".decode("ascii", "surrogateescape")
    # the name as Python holds it (and as every other message and log line shows it: \udce9), not a second spelling;
    # in a UTF-8 locale the name is in another encoding (probe 25: the advice to use a UTF-8 locale did not apply)
    with pytest.raises(InputError, match=r"thick_\udce9.*not UTF-8.*another encoding \(e.g. Latin-1") as info:
        itk_path(latin1)
    assert "PYTHONUTF8" not in str(info.value)
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")  # LC_ALL=C with PYTHONUTF8=0
    with pytest.raises(InputError, match=r"thick_\udce9.*not UTF-8.*PYTHONUTF8=1"):
        itk_path(latin1)


# -- 3: consoles that cannot encode the output --------------------------------------------------------------------
def test_evaluate_on_a_cp1252_console_keeps_its_json_and_succeeds(tmp_path, small_ct):
    folder = tmp_path / "réf_中文"
    folder.mkdir()
    ref = folder / "thin_😀.nii.gz"
    ref.write_bytes(small_ct.read_bytes())
    proc = run_cli("evaluate", "--reference", str(ref), "--factor", "2", "--methods", "nearest", "cubic",
                   "--json", "r_中文.json", "--progress", "none", cwd=tmp_path,
                   PYTHONIOENCODING="cp1252")  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # before: exit 1, an internal UnicodeEncodeError, no JSON
    report = json.loads((tmp_path / "r_中文.json").read_text(encoding="utf-8"))
    assert report["reference"] == str(ref)
    assert "\\u4e2d\\u6587" in proc.stdout  # the table names the reference, escaped


def test_evaluate_writes_its_json_before_printing(tmp_path, small_ct, monkeypatch):
    """A console that fails (a closed pipe) after the scores are computed must not lose the JSON."""
    from DiffusionCore.cli.main import main

    class _ClosedPipe:
        encoding = "utf-8"

        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    main(["evaluate", "--reference", str(small_ct), "--factor", "2", "--methods", "cubic", "--json", "r.json",
          "--progress", "none"])  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["reference"] == str(small_ct)


def test_sample_data_list_on_an_ascii_console(tmp_path):
    proc = run_cli("sample-data", "--list", cwd=tmp_path, DIFFUSIONCORE_CACHE=str(tmp_path / "cache_中文"),
                   PYTHONIOENCODING="ascii")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\\u4e2d\\u6587" in proc.stdout


# -- 4: Slicer jobs ----------------------------------------------------------------------------------------------
def test_job_children_write_the_utf8_their_parent_reads(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "CTDiffusionSR"))
    from CTDiffusionSRLib import jobs

    env = {**os.environ, "PYTHONIOENCODING": "cp1252", **jobs.job_environment()}  # a piped Python on Windows
    proc = subprocess.run([sys.executable, "-c", "print('Jos\\u00e9 \\u4e2d\\u6587')"], capture_output=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("utf-8").strip() == "José 中文"  # as ProcessRunner decodes it


# -- 5, 7, 8, 9, 10, 11: list files -------------------------------------------------------------------------------
def test_list_file_with_bom_crlf_hash_names_and_quotes(tmp_path, small_ct):
    hashed = tmp_path / "a#b"
    hashed.mkdir()
    (hashed / "Serie #3.nii.gz").write_bytes(small_ct.read_bytes())
    (hashed / "Patient#12.nii.gz").write_bytes(small_ct.read_bytes())
    lines = ["# the cohort", f'"{small_ct}"', "  a#b/Serie #3.nii.gz  ", "a#b/Patient#12.nii.gz\t# a comment", ""]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))  # Notepad's "UTF-8"
    assert collect_volumes(listing) == [small_ct, hashed / "Serie #3.nii.gz", hashed / "Patient#12.nii.gz"]


def test_list_file_relative_path_error_names_the_path_tried(tmp_path, small_ct, diffusioncore_log):
    """A missing entry is named with the path tried (and passed over as an unreadable one is: Testing/test_io_probe19.py)."""
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "rel.txt").write_text("small.nii.gz\n", encoding="utf-8")
    assert collect_volumes(sub / "rel.txt") == [sub / "small.nii.gz"]
    said = [r.getMessage() for r in diffusioncore_log if r.levelname == "WARNING"]
    assert any(f"line 1: {sub / 'small.nii.gz'} (relative paths are taken from the list file's folder) does not exist"
               in line for line in said), said


def test_list_file_not_utf8_says_to_save_it_as_utf8(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("thick_é.nii.gz\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 0xe9 at position 6\): save it as UTF-8"):
        collect_volumes(latin)


def test_csv_list_is_a_batch_for_sr_as_for_train(tmp_path, small_ct):
    from DiffusionCore.cli.sr import batch_sources

    listing = tmp_path / "liste.csv"
    listing.write_bytes(b"small.nii.gz\r\n")
    assert batch_sources(listing) == (True, [small_ct])
    assert collect_volumes(listing) == [small_ct]


# -- 6, 12: configs ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Settings:
    learning_rate: float = 1e-4
    max_steps: int = 10


def test_json_config_with_bom(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(b'\xef\xbb\xbf{"max_steps": 2,\r\n "learning_rate": 0.5}\r\n')
    assert read_config_file(cfg) == {"max_steps": 2, "learning_rate": 0.5}


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "0.001", "+1e-3"])
def test_yaml_exponent_floats(tmp_path, text):
    cfg = tmp_path / "lr.yaml"
    cfg.write_text(f"learning_rate: {text}\nmax_steps: 2\n", encoding="utf-8")
    assert load_config(cfg, _Settings) == _Settings(learning_rate=0.001, max_steps=2)


def test_yaml_quoted_number_is_still_a_string(tmp_path):
    cfg = tmp_path / "lr.yaml"
    cfg.write_text("learning_rate: '1e-3'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected float"):
        load_config(cfg, _Settings)


# -- 2, 6, 14: the weights registry -------------------------------------------------------------------------------
def test_registry_with_bom_is_read(tmp_path):
    path = tmp_path / "registry.json"
    entry = {"file": "a.safetensors", "sha256": "0" * 64, "family": "sr", "description": "Modèle 中文"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"weights": {"mine": entry}}, indent=2).replace("\n", "\r\n")
                     .encode("utf-8"))  # fmt: skip
    assert registry.read_registry(path) == {"mine": entry}


def test_the_panels_list_a_registry_with_a_bom_as_the_engine_reads_it(tmp_path, monkeypatch):
    """The engine read a registry saved with a byte-order mark, but the Slicer panels' own reader called it unreadable
    and offered none of its weights: both read it with weights.entries.read_registry now."""
    pytest.importorskip("slicer")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CTDiffusionSR"))
    from CTDiffusionSRLib.weights_choice import registered_weights

    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path))
    path = tmp_path / "weights" / "registry.json"
    path.parent.mkdir()
    (path.parent / "a.safetensors").write_bytes(b"x")
    entry = {"file": "a.safetensors", "sha256": "0" * 64, "family": "sr", "description": "Modèle"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"weights": {"mine": entry}}).encode("utf-8"))
    mine = [e for e in registered_weights("sr") if e.name == "mine"]
    assert [(e.source, e.path, e.available, e.description) for e in mine] == [
        ("user", path.parent / "a.safetensors", True, "Modèle")]
    assert [w["name"] for w in registry.list_weights("sr")][-1] == "mine"


def test_undecodable_description_is_refused_and_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path / "cache"))
    typed = "Mod\udcc3\udca8le"  # "Modèle" typed under a C locale without UTF-8 mode: bytes kept as surrogates
    with pytest.raises(WeightsError, match="Modèle.*UTF-8 locale"):
        registry.import_weights(tmp_path / "w.safetensors", "mine", description=typed)
    path = tmp_path / "registry.json"
    with pytest.raises(WeightsError, match="'mine'.*cannot be stored as UTF-8"):
        registry.write_registry(path, {"mine": {"description": typed}})
    assert not path.exists()


def test_weights_list_of_a_registry_holding_lone_surrogates(tmp_path):
    """A registry an earlier version poisoned (defect 2) still lists on a strict UTF-8 console, escaped."""
    folder = tmp_path / "cache" / "weights"
    folder.mkdir(parents=True)
    entry = {"file": "w.safetensors", "sha256": "0" * 64, "family": "sr", "description": "Mod\udcc3\udca8le"}
    (folder / "registry.json").write_text(json.dumps({"weights": {"mine": entry}}), encoding="utf-8")
    proc = run_cli("weights", "list", cwd=tmp_path, DIFFUSIONCORE_CACHE=str(tmp_path / "cache"),
                   PYTHONIOENCODING="utf-8")  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # before: internal error (UnicodeEncodeError ... surrogates)
    assert "mine" in proc.stdout and "Mod" in proc.stdout


def test_weights_name_message_says_ascii_letters(tmp_path):
    with pytest.raises(WeightsError, match=r"ASCII letters \(a-z, A-Z\)"):
        registry.import_weights(tmp_path / "w.safetensors", "modèle_中文")


# -- 13: the training panels' placeholder ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ui", "families"),
    [("CTDiffusionSR/Resources/UI/CTDiffusionSR.ui", ("throughplane", "sr", "vae")),
     ("XrayToCT/Resources/UI/XrayToCT.ui", ("xray",))],
)  # fmt: skip
def test_extra_options_placeholder_is_accepted(ui, families):
    from DiffusionCore.cli.main import build_parser

    widget = next(w for w in ET.parse(ROOT / ui).iter("widget") if w.get("name") == "trainingExtraArgumentsLineEdit")
    text = next(p.find("string").text for p in widget.iter("property") if p.get("name") == "placeholderText")
    options = text.removeprefix("e.g. ").split()
    for family in families:
        args, unknown = build_parser().parse_known_args(["train", family, "--data", "d", "--out-dir", "o", *options])
        assert unknown == [], (family, unknown)


@pytest.mark.parametrize("family, text", [
    ("throughplane", '{"model": {"channelz": 3}}'),
    ("sr", '{"train": {"learning_ratez": 1}}'),
])
def test_a_config_key_error_names_the_config_file(family, text, tmp_path, capsys):
    """train throughplane and train sr read the file, merged the command line's options into it and then said "in
    config": the user is told which file holds the mistake."""
    from DiffusionCore.cli.main import main

    config = tmp_path / "my config é.json"
    config.write_text(text, encoding="utf-8")
    extra = ["--vae", str(tmp_path)] if family == "sr" else []
    (tmp_path / "data").mkdir()
    rc = main(["train", family, "--config", str(config), "--data", str(tmp_path / "data"), "--out-dir",
               str(tmp_path / "run"), *extra])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert f"in {config} (did you mean" in err, err
