"""Engine directories as the server and the CLI meet them: thresholds checked at load, files readable by
others, and `inspect` on a damaged export (verification failure first, never a traceback)."""
import json
import shutil
import stat

import pytest
from click.testing import CliRunner

from tda_export import manifest
from tda_export.calibration import CALIBRATION_FILE
from tda_export.cli import main
from tda_export.runtime.engine import Engine, EngineError


@pytest.fixture
def engine_copy(served_engine_dir, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(served_engine_dir, out)
    return out


def rehash(directory):
    """Re-sign the directory, as someone editing a file and its hash would: the hash check then passes."""
    data = manifest.read(directory)
    data.pop("files")
    manifest.write(directory, data)


def edit_calibration(directory, change):
    path = directory / CALIBRATION_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    rehash(directory)


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["thresholds"].__setitem__("0.50", [float("nan")] * d["num_layers"]), "nan"),
    (lambda d: d["thresholds"]["0.50"].__setitem__(1, 7.0), "7.0"),
    (lambda d: d["thresholds"]["0.50"].pop(), "expected 3"),
    (lambda d: d.__setitem__("fingerprint", "0" * 16), "fingerprint"),
], ids=["nan", "above-1", "short", "other-model"])
def test_bad_calibration_is_a_clear_load_error(engine_copy, change, needle):
    edit_calibration(engine_copy, change)
    with pytest.raises(EngineError, match=CALIBRATION_FILE) as e:
        Engine.load(engine_copy, backend="onnxruntime", threads=1)
    assert needle in str(e.value)
    r = CliRunner().invoke(main, ["run", "-e", str(engine_copy), "-p", "hi", "--backend", "onnxruntime"])
    assert r.exit_code == 2 and "Traceback" not in r.output and CALIBRATION_FILE in r.output


def test_manifest_thresholds_are_checked_too(engine_copy):
    data = manifest.read(engine_copy)
    data["calibration"]["thresholds"] = [float("inf")] * data["num_layers"]
    data.pop("files")
    manifest.write(engine_copy, data)
    with pytest.raises(EngineError, match="manifest.json calibration.thresholds"):
        Engine.load(engine_copy, backend="onnxruntime", threads=1)


def test_engine_files_are_world_readable(served_engine_dir):
    for p in served_engine_dir.iterdir():
        assert p.stat().st_mode & stat.S_IROTH, f"{p.name} is {oct(p.stat().st_mode)}"


def test_inspect_on_a_truncated_model_reports_verification_first(engine_copy):
    model = engine_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    r = CliRunner().invoke(main, ["inspect", str(engine_copy)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("error: verification failed") and "model.onnx" in lines[0]
    assert any("not a readable ONNX model" in l for l in lines)


def test_inspect_of_a_good_engine_verifies(served_engine_dir):
    r = CliRunner().invoke(main, ["inspect", str(served_engine_dir)])
    assert r.exit_code == 0 and r.output.splitlines()[-1].startswith("verified")


def corrupt_safetensors_header(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at "  # the header's first bytes, after its 8-byte length
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,file,needle", [
    (lambda d: edit_calibration(d, lambda c: c["thresholds"]["0.50"].__setitem__(0, float("nan"))),
     CALIBRATION_FILE, "nan"),
    (lambda d: ((d / "tokenizer.json").write_text("garbage{{"), rehash(d)), "tokenizer.json", "tokenizer"),
    (lambda d: (corrupt_safetensors_header(d), rehash(d)), "model.safetensors", "safetensors"),
], ids=["nan-thresholds", "garbage-tokenizer", "safetensors-header"])
def test_inspect_refuses_what_run_refuses_naming_the_file(engine_copy, damage, file, needle):
    """The hashes match (the manifest was re-signed after the edit), yet the engine is unusable: inspect must
    not say "verified", and names the file."""
    damage(engine_copy)
    r = CliRunner().invoke(main, ["inspect", str(engine_copy)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [l for l in r.output.splitlines() if l.startswith("error: ")]
    assert errors and str(engine_copy / file) in errors[0] and needle in errors[0], r.output
    assert not any(l.startswith("verified") for l in r.output.splitlines())
