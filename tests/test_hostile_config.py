"""Hostile and careless configuration, table-driven: every case is refused before any process
group starts, with exit status 2 and ONE line that names the file or key at fault (issue 12
items 6 and 9). Cases run through `vilbert_ds.cli.main` in-process (the refusal happens before
anything distributed), one through a real `python -m` process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fixtures.tasks import write_task_ds_config
from fixtures.training import REPO, write_ds_config
from vilbert_ds.config import UNUSED_KEYS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "ok.yaml").write_text("data: {train: /nonexistent/manifest.json}\nmodel: {config: tiny}\n"
                               f"train: {{output_dir: {d / 'run'}}}\n")
    (d / "syntax.yaml").write_text("data:\n  train: /x/manifest.json\n  shuffle: [true\nmodel: {config: tiny}\n")
    (d / "shuffle_no.yaml").write_text('data: {train: /x/manifest.json, shuffle: "no"}\n')
    write_ds_config(d / "ds.json", stage=1)
    (d / "broken.json").write_text('{"train_micro_batch_size_per_gpu": 2,\n "gradient_clipping": 1.0,,\n}')
    return d


def _task_argv(argv: list[str], synthetic_tasks, d) -> list[str]:
    """`vilbert-ds <command> --deepspeed DS <case> <overrides for the synthetic task shards>`."""
    ds = write_task_ds_config(d / "task_ds.json")
    return [argv[0], "--deepspeed", str(ds), *argv[1:], f"tasks.registry={synthetic_tasks}", "model.config=tiny",
            f"train.output_dir={d / 'mt'}"]


# (id, command after `vilbert-ds`, what the one line must name); {d} = the files fixture
PRETRAIN = ["pretrain", "--config", "{d}/ok.yaml", "--deepspeed", "{d}/ds.json"]
CASES = [
    ("yaml-syntax", ["pretrain", "--config", "{d}/syntax.yaml", "--deepspeed", "{d}/ds.json"], "syntax.yaml:4: YAML syntax error"),
    ("string-for-bool", ["pretrain", "--config", "{d}/shuffle_no.yaml", "--deepspeed", "{d}/ds.json"], "data.shuffle: expected true or false, got 'no'"),
    ("override-string-for-bool", PRETRAIN + ["train.compile=yes please"], "train.compile"),
    ("float-for-int", PRETRAIN + ["train.save_every=1.5"], "train.save_every: expected an integer, got 1.5"),
    ("word-for-number", PRETRAIN + ["optim.warmup_fraction=abc"], "optim.warmup_fraction"),
    ("unknown-key", PRETRAIN + ["train.totl_steps=3"], "totl_steps"),
    ("unknown-section", PRETRAIN + ["optimizer.lr=3"], "unknown sections ['optimizer']"),
    ("no-such-preset", ["pretrain", "--config", "nosuch_preset", "--deepspeed", "{d}/ds.json"], "nosuch_preset"),
    ("tasks-for-pretrain", PRETRAIN + ["tasks.names=vqa"], "tasks is not read by a pretrain run"),
    ("negative-eps", PRETRAIN + ["ds.optimizer.params.eps=-1e-8"], "optimizer.params.eps"),
    ("negative-weight-decay", PRETRAIN + ["ds.optimizer.params.weight_decay=-0.01"], "optimizer.params.weight_decay"),
    ("betas-scalar", PRETRAIN + ["ds.optimizer.params.betas=0.9"], "optimizer.params.betas"),
    ("fp16-not-object", PRETRAIN + ["ds.fp16=true"], "fp16: True must be an object"),
    ("bf16-enabled-string", PRETRAIN + ["ds.bf16.enabled=maybe"], "bf16.enabled"),
    ("nested-ds-typo", PRETRAIN + ["ds.zero_optimization.stgae=2"], "zero_optimization.stgae"),
    ("offload-typo", PRETRAIN + ["ds.zero_optimization.offload_optimizer.devcie=cpu"], "offload_optimizer.devcie"),
    ("ds-bad-yaml", PRETRAIN + ["ds.zero_optimization={{stage: 2"], "ds.zero_optimization"),
    ("ds-json-syntax", ["pretrain", "--config", "{d}/ok.yaml", "--deepspeed", "{d}/broken.json"], "broken.json:2"),
    ("init-from-missing", PRETRAIN + ["model.init_from=/nonexistent/model"], "/nonexistent/model"),
    ("eval-unknown-task", ["eval", "--task", "nosuch", "--ckpt", "{d}"], "unknown task 'nosuch'"),
]
TASK_CASES = [  # multitask / finetune on the synthetic task shards
    ("pretraining-key-for-tasks", ["multitask", "--tasks", "vqa", "data.mask_prob=0.2"], "data.mask_prob is not read by a multitask run"),
    ("img-weight-for-finetune", ["finetune", "--task", "vqa", "--from", "{d}", "train.img_weight=2"], "train.img_weight"),
    ("unknown-task", ["multitask", "--tasks", "vqa,nosuch"], "unknown task 'nosuch'"),
    ("two-tasks-to-finetune", ["finetune", "--task", "vqa,gqa", "--from", "{d}"], "finetune trains one task"),
    ("batch-larger-than-the-data", ["multitask", "--tasks", "vqa", "tasks.batch_size.vqa=256"], "set tasks.batch_size.vqa=16"),
    ("batch-not-divisible", ["multitask", "--tasks", "vqa", "tasks.batch_size.vqa=3", "ds.gradient_accumulation_steps=2",
                             "ds.train_micro_batch_size_per_gpu=2"], "set tasks.batch_size.vqa=2"),
    ("task-shards-missing", ["multitask", "--tasks", "vqa", "tasks.data_root=/nonexistent"], "vilbert-ds shards task --task vqa"),
    ("string-for-int-in-tasks", ["multitask", "--tasks", "vqa", "tasks.batch_size.vqa=many"], "tasks.batch_size.vqa"),
]


def _refused(capsys, argv: list[str], expected: str) -> None:
    from vilbert_ds.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert expected in err, err


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_one_line(files, capsys, argv, expected):
    _refused(capsys, [a.format(d=files) for a in argv], expected)


@pytest.mark.parametrize("argv, expected", [c[1:] for c in TASK_CASES], ids=[c[0] for c in TASK_CASES])
def test_task_runs_refused_with_one_line(files, synthetic_tasks, capsys, argv, expected):
    _refused(capsys, _task_argv([a.format(d=files) for a in argv], synthetic_tasks, files), expected)


def test_a_real_process_exits_2_with_one_line(files):
    done = subprocess.run([sys.executable, "-m", "vilbert_ds.pretrain", "--config", str(files / "shuffle_no.yaml"),
                           "--deepspeed", str(files / "ds.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "data.shuffle" in done.stderr and "shuffle_no.yaml" in done.stderr


def test_ds_override_values_are_yaml_typed(files):
    """`ds.bf16.enabled=False` turns bf16 off (it used to arrive as the string "False", read as true)."""
    from vilbert_ds.engine import load_ds_config, validate_ds_config

    path = files / "bf16.json"
    path.write_text(json.dumps({**json.loads((files / "ds.json").read_text()), "bf16": {"enabled": True}}))
    for text, precision in (("False", "fp32"), ("false", "fp32"), ("no", "fp32"), ("true", "bf16")):
        cfg = load_ds_config(path, [f"bf16.enabled={text}"])
        assert validate_ds_config(cfg, source=str(path), world_size=1, accelerator="cuda").precision == precision, text
    assert load_ds_config(path, ["optimizer.params.lr=2e-5"])["optimizer"]["params"]["lr"] == 2e-5  # a number


@pytest.mark.parametrize("kind, key", [(k, key) for k, keys in UNUSED_KEYS.items() for key in keys])
def test_every_key_a_kind_does_not_read_is_refused_by_name(kind, key):
    from vilbert_ds.config import ConfigError, TrainConfig

    override = "tasks.names=vqa" if key == "tasks" else f"{key}=1"
    with pytest.raises(ConfigError, match=rf"{key} is not read by a {kind} run"):
        TrainConfig.load(None, ["data.train=/x/manifest.json"] * (kind == "pretrain") + [override], kind=kind)
