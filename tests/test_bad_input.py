"""Bad input gets a clear error naming the file/tensor and what to do; nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from .conftest import default_sigint, write_safetensors


def run_cli(*args):
    """Invoke the CLI like a user would; returns (exit_code, output)."""

    proc = subprocess.run([sys.executable, "-c", "from q.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def model(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(256, 128, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(128).bfloat16(),
    }
    return write_safetensors(tmp_path / "m", tensors)


def test_missing_config(model):
    (model / "config.json").unlink()
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "-o", model.parent / "o")
    assert code != 0 and "config.json" in out and "Traceback" not in out


def test_unreadable_config(model):
    (model / "config.json").write_text("{not json")
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "-o", model.parent / "o")
    assert code != 0 and "config.json: unreadable or not JSON" in out


def test_corrupt_header(model):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    code, out = run_cli("inspect", model)
    assert code != 0 and "corrupt safetensors header" in out and str(f) in out


def test_truncated_header(model):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:30])
    code, out = run_cli("inspect", model)
    assert code != 0 and "truncated" in out


def test_tensor_runs_past_end(model):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "--dry-run")
    assert code != 0 and "runs past the end of the file" in out and "up_proj" in out


def test_header_dtype_disagrees_with_bytes(model):
    f = model / "model.safetensors"
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    header["model.layers.0.mlp.up_proj.weight"]["dtype"] = "F32"
    new = json.dumps(header, separators=(",", ":")).encode().ljust(hlen)
    assert len(new) == hlen
    f.write_bytes(raw[:8] + new + raw[8 + hlen:])
    code, out = run_cli("inspect", model)
    assert code != 0 and "up_proj.weight' is F32" in out and "inconsistent" in out


def test_index_names_missing_shard(model):
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors"}}))
    code, out = run_cli("inspect", model)
    assert code != 0 and "model-00002-of-00002.safetensors" in out and "missing" in out


def test_index_names_tensor_the_shard_lacks(model):
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.mlp.gate_proj.weight": "model.safetensors"}}))
    code, out = run_cli("inspect", model)
    assert code != 0 and "gate_proj.weight" in out and "has no such tensor" in out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_refused(model, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, str(f))
    code, out = run_cli("quantize", model, "--scheme", "fp8-dynamic", "-o", tmp_path / "o")
    assert code != 0 and "up_proj.weight' contains NaN or Inf" in out
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.q-partial-*"))


def test_unknown_scheme_format_option(model, tmp_path):
    code, out = run_cli("quantize", model, "--scheme", "fp9", "-o", tmp_path / "o")
    assert code != 0 and "unknown scheme 'fp9'; choose one of:" in out and "fp8-block" in out
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "--format", "gguf",
                        "-o", tmp_path / "o")
    assert code != 0 and "unknown format 'gguf'" in out and "compressed-tensors" in out
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "--group-size", "64",
                        "-o", tmp_path / "o")
    assert code != 0 and "does not take group_size" in out
    code, out = run_cli("quantize", model, "--scheme", "fp8-dynamic", "--format", "hf-fp8",
                        "-o", tmp_path / "o")
    assert code != 0 and "hf-fp8 stores 128x128 block fp8 only" in out
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "--bogus")
    assert code != 0 and "No such option" in out


def test_output_exists_needs_overwrite(model, tmp_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "-o", out_dir)
    assert code != 0 and "already exists" in out and "--overwrite" in out
    assert (out_dir / "keep.txt").read_text() == "precious"
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "-o", out_dir, "--overwrite")
    assert code == 0, out
    assert (out_dir / "config.json").exists() and not (out_dir / "keep.txt").exists()


def test_output_may_not_replace_input(model):
    code, out = run_cli("quantize", model, "--scheme", "fp8-block", "-o", model, "--overwrite")
    assert code != 0 and "would replace the input" in out
    assert (model / "model.safetensors").exists()


def test_already_quantized_input(model, tmp_path):
    code, _ = run_cli("quantize", model, "--scheme", "fp8-block", "-o", tmp_path / "o")
    assert code == 0
    code, out = run_cli("quantize", tmp_path / "o", "--scheme", "wint8", "-o", tmp_path / "o2")
    assert code != 0 and "already quantized" in out and "q export" in out and "q dequantize" in out


def test_disk_full_leaves_nothing(model, tmp_path):
    """RLIMIT_FSIZE makes writes past 20 kB fail the way a full disk does."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000));"
        "from q.cli import main; main(sys.argv[1:])"
    )
    out_dir = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", code, "quantize", str(model), "--scheme",
                           "wint8", "-o", str(out_dir)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert not out_dir.exists() and not list(tmp_path.glob(".o.q-partial-*"))
    code, out = run_cli("quantize", model, "--scheme", "wint8", "-o", out_dir)  # rerun works
    assert code == 0, out


def start_quantize_of_big_model(tmp_path, scheme):
    """Start `q quantize` on a 200 MB model in a child; return once it is writing.

    Returns (process, model dir, output dir). The partial directory exists when this
    returns, so a signal sent now always interrupts a run that has begun writing.
    """
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 2048, generator=g).bfloat16()
               for i in range(24)}
    model = write_safetensors(tmp_path / "big", tensors)
    out_dir = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", "from q.cli import main; main()", "quantize",
                             str(model), "--scheme", scheme, "-o", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".o.q-partial-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".o.q-partial-*")), "the run never started writing"
    return proc, model, out_dir


def test_sigkill_leaves_no_complete_looking_output(tmp_path):
    proc, model, out_dir = start_quantize_of_big_model(tmp_path, "wint8")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not out_dir.exists(), "a killed run must not leave the output directory"
    code, out = run_cli("quantize", model, "--scheme", "wint8", "-o", out_dir)
    assert code == 0, out
    assert not list(tmp_path.glob(".o.q-partial-*")), "stale partial output was not cleaned"


def test_input_is_never_modified(model, tmp_path):
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    code, out = run_cli("quantize", model, "--scheme", "wint4", "--group-size", "64", "-o",
                        tmp_path / "o")
    assert code == 0, out
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_ctrl_c_leaves_nothing(tmp_path):
    proc, _, out_dir = start_quantize_of_big_model(tmp_path, "wint4")
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted; no output was written." in err and "Traceback" not in err
    assert not out_dir.exists() and not list(tmp_path.glob(".o.q-partial-*"))
