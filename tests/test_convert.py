"""`vilbert-ds convert` and `vilbert-ds info`."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

import vilbert_ds
from vilbert_ds.cli import main as cli
from vilbert_ds.commands.info import layer_schedule
from vilbert_ds.model import resolve_config
from vilbert_ds.weights import TIED_DECODER, to_original


@pytest.fixture
def original_files(random_tiny_model, tmp_path):
    """A 12-in-1-style checkpoint (task tokens + heads), a pretraining one, and the JSON config."""
    mt = random_tiny_model(task_specific_tokens=True, dtype=torch.float32)
    pt = random_tiny_model(with_task_heads=False, dtype=torch.float32, seed=1)
    torch.save(to_original(mt), tmp_path / "multi_task_model.bin")
    torch.save({f"module.{k}": v for k, v in to_original(pt).items()}, tmp_path / "pretrained_model.bin")
    resolve_config("tiny").to_json(tmp_path / "bert_tiny.json")
    resolve_config("tiny", bi_hidden_size=20).to_json(tmp_path / "bert_tiny_wider.json")
    return {"mt": mt, "pt": pt, "dir": tmp_path, "config": str(tmp_path / "bert_tiny.json")}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------- convert
def test_original_to_vilbert_ds_and_back_is_lossless(original_files, capsys, tiny_batch):
    d = original_files["dir"]
    code, out, err = run_cli(capsys, "convert", d / "multi_task_model.bin", d / "ds", "--config", original_files["config"])
    assert code == 0, err
    assert "task tokens yes, task heads yes" in out
    model = vilbert_ds.load_model(d / "ds").eval()
    mt = original_files["mt"]
    batch = tiny_batch(mt.config, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**batch).vil_prediction, mt(**batch).vil_prediction)
    code, out, err = run_cli(capsys, "convert", d / "ds", d / "again.bin")
    assert code == 0, err
    again = torch.load(d / "again.bin", weights_only=True)
    first = torch.load(d / "multi_task_model.bin", weights_only=True)
    assert again.keys() == first.keys() and TIED_DECODER in again  # the original layout, decoder written out
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_pretraining_checkpoint_with_module_prefix_and_task_heads(original_files, capsys):
    d = original_files["dir"]
    code, out, _ = run_cli(capsys, "convert", d / "pretrained_model.bin", d / "cc", "--config", "tiny")
    assert code == 0 and "task tokens no, task heads no" in out
    assert not vilbert_ds.load_model(d / "cc").config.with_task_heads
    code, out, _ = run_cli(capsys, "convert", d / "pretrained_model.bin", d / "cc_heads", "--config", "tiny",
                           "--task-heads")
    assert code == 0 and "task heads yes" in out
    assert "keys not in" in out and "  vil_prediction.logit_fc.0.weight" in out.splitlines()
    model = vilbert_ds.load_model(d / "cc_heads")
    assert torch.equal(model.bert.encoder.c_layer[1].biattention.value2.weight,
                       original_files["pt"].bert.encoder.c_layer[1].biattention.value2.weight)


def test_missing_keys_fail_in_one_line_unless_allowed(original_files, capsys):
    d = original_files["dir"]
    state = torch.load(d / "multi_task_model.bin", weights_only=True)
    del state["bert.v_pooler.dense.bias"]
    torch.save(state, d / "partial.bin")
    code, out, err = run_cli(capsys, "convert", d / "partial.bin", d / "p", "--config", "tiny")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vilbert-ds convert: error:")
    assert "missing keys (1): bert.v_pooler.dense.bias" in err and "--allow-missing" in err
    assert not (d / "p" / "model.safetensors").exists()
    code, out, err = run_cli(capsys, "convert", d / "partial.bin", d / "p", "--config", "tiny", "--allow-missing")
    assert code == 0, err
    assert "1 keys not in" in out and "  bert.v_pooler.dense.bias" in out.splitlines()


@pytest.mark.parametrize("argv, message", [
    (["{d}/multi_task_model.bin", "{d}/x"], "--config is required"),
    (["{d}/absent.bin", "{d}/x", "--config", "tiny"], "absent.bin' does not exist"),
    (["{d}/multi_task_model.bin", "{d}/x", "--config", "no_such_preset"], "neither a preset"),
    (["{d}/garbage.bin", "{d}/x", "--config", "tiny"], "cannot be read as a weights-only torch checkpoint"),
    (["{d}", "{d}/x.bin"], "directory without config.json"),
    (["{d}/multi_task_model.bin", "{d}/x", "--config", "{d}/bert_tiny_wider.json"],
     "shape mismatches (54): bert.encoder.c_layer.0.biOutput.dense1.weight: file (48, 40) vs model (48, 20)"),
])
def test_errors_are_one_line_with_exit_code_2(original_files, capsys, argv, message):
    d = original_files["dir"]
    (d / "garbage.bin").write_bytes(b"not a torch file")
    code, out, err = run_cli(capsys, "convert", *(a.format(d=d) for a in argv))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


def test_existing_destinations_need_force(original_files, capsys):
    d = original_files["dir"]
    args = ["convert", d / "multi_task_model.bin", d / "ds", "--config", "tiny"]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--force" in err
    assert run_cli(capsys, *args, "--force")[0] == 0
    (d / "taken.bin").write_bytes(b"x")
    code, _, err = run_cli(capsys, "convert", d / "ds", d / "taken.bin")
    assert code == 2 and "--force" in err
    code, _, err = run_cli(capsys, "convert", d / "ds", d / "y.bin", "--config", "tiny")
    assert code == 2 and "apply to original -> vilbert-ds" in err


# ---------------------------------------------------------------------------- info
def test_layer_schedule_strings():
    assert layer_schedule(resolve_config("base_6layer_6conect")) == (
        "T0..T5 ; C0 ; [T6 V0] C1 ; [T7 V1] C2 ; [T8 V2] C3 ; [T9 V3] C4 ; [T10 V4] C5 ; V5 ; T11")
    assert layer_schedule(resolve_config("base_2layer_2conect")) == "T0..T9 ; C0 ; [T10 V0] C1 ; V1 ; T11"
    cfg = resolve_config("tiny", v_num_hidden_layers=3, v_biattention_id=[1, 2], t_biattention_id=[1, 3])
    assert layer_schedule(cfg) == "[T0 V0] C0 ; [T1..T2 V1] C1 ; V2 ; T3"


def test_info_counts_the_base_model_by_part(capsys):
    code, out, err = run_cli(capsys, "info", "base_6layer_6conect", "--task-tokens", "--json")
    assert code == 0, err
    info = json.loads(out)
    p = info["parameters"]
    assert p["total"] == 268_028_859 and sum(p["parts"].values()) == p["total"]
    assert p["unused_q_dense"] == 11_020_800 and p["trainable"] == p["total"] - p["unused_q_dense"]
    assert p["task_embeddings"] == 20 * 768
    assert p["parts"]["coattention_blocks"] == 96_081_408  # 6 x 16.01M incl. q_dense
    assert sum(p["per_head"].values()) == p["parts"]["task_heads"]
    assert info["heads"]["vil_prediction"] == ["B", 3129] and info["heads"]["vil_binary_prediction"] == ["B/2", 2]
    assert info["schedule"].startswith("T0..T5 ; C0 ; [T6 V0] C1")
    if "flops_per_sample" in info:  # present when vilbert_ds.metrics provides vilbert_flops
        assert info["flops_per_sample"]["forward"] > 1e10
    code, out, _ = run_cli(capsys, "info", "base_6layer_6conect")
    assert code == 0 and "268,013,499" in out and "unused q_dense1/q_dense2" in out


def test_info_on_a_json_a_model_dir_and_a_checkpoint(original_files, capsys):
    d = original_files["dir"]
    code, out, _ = run_cli(capsys, "info", original_files["config"], "--json")
    assert code == 0 and json.loads(out)["task_tokens"] is False
    assert run_cli(capsys, "convert", d / "pretrained_model.bin", d / "cc", "--config", "tiny")[0] == 0
    code, out, _ = run_cli(capsys, "info", d / "cc", "--json")
    info = json.loads(out)
    assert code == 0 and "vision_logit" not in info["heads"] and info["parameters"]["parts"]["task_heads"] == 0
    code, out, _ = run_cli(capsys, "info", d / "multi_task_model.bin", "--config", "tiny", "--json")
    info = json.loads(out)
    assert code == 0 and info["task_tokens"] is True and "vil_logit" in info["heads"]
    assert info["parameters"]["total"] == vilbert_ds.count_parameters(original_files["mt"])
    code, out, err = run_cli(capsys, "info", d / "nothing_here")
    assert code == 2 and err.startswith("vilbert-ds info: error:") and "nothing_here" in err


def test_console_command_is_installed_and_wired():
    command = shutil.which("vilbert-ds")
    assert command, "the vilbert-ds console command is not on PATH: `pip install -e .` installs it"
    proc = subprocess.run([command, "info", "tiny"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "preset tiny" and "total" in proc.stdout
