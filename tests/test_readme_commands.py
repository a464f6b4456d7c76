"""The commands README.md and docs/*.md show, tried one by one as written.

Every command line of a shell code block, and every command quoted in the prose, is found by
`doc_commands()`. Each one is either

  * RUN: executed as written in a scratch directory whose documented placeholders (an original
    checkpoint `multi_task_model.bin`, a features LMDB, a run directory, ...) the group's setup
    writes, small; the command must exit 0 (and print what the docs say it prints, where they
    say it), or
  * NOT_RUN: listed with the reason it is not run here (GPUs, a cluster, minutes of training,
    files only the user has). Those are still checked as far as is cheap: every `vilbert-ds` and
    `python -m vilbert_ds...` line is parsed by the command's own parser (an option the docs
    advertise must exist), a training line loads its config with the documented overrides and
    checks its DeepSpeed config for that many ranks, a `deepspeed` / `torchrun` line is parsed by
    the launcher's parser, a script's `--help` names every option the line uses, a shell
    script exists, parses and documents the variables the line sets.

A command the docs gain is neither, and fails `test_every_documented_command_is_run_or_listed`
by name; a listed command the docs lost fails it too. `vilbert-ds` lines run in this process
through `vilbert_ds.cli.main` (what the installed script calls; tests/test_cli.py runs the script
itself), `python -m` lines through runpy: a few seconds for the lot instead of a Python start-up
each.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("vilbert-ds", "python", "python3", "bash", "deepspeed", "torchrun", "sbatch", "srun", "scancel", "pip", "npm")
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```", re.M | re.S)
ENV_WORD = re.compile(r"\[?[A-Z_][A-Z0-9_]*=\S*\]?")  # VAR=value, or [VAR=value] (optional)
TRAINING = ("pretrain", "multitask", "finetune")


# ============================================================================ finding commands
def _commands_in(text: str) -> list[list[str]]:
    """The commands of one shell line (split at &&, ;, ||) that start with a known program."""
    try:
        words = shlex.split(text)
    except ValueError:
        return []
    # a comment starts at a word beginning with '#' (not inside one: features.tsv#1060 picks an image)
    words = words[:next((i for i, w in enumerate(words) if w.startswith("#")), len(words))]
    out, current = [], []
    for w in [*words, "&&"]:
        if w in ("&&", ";", "||"):
            start = next((i for i, t in enumerate(current) if not ENV_WORD.fullmatch(t)), len(current))
            if start < len(current) and current[start] in PROGRAMS:
                out.append(current)
            current = []
        else:
            current.append(w)
    return out


def _program(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """({VAR: value} set in front, the command from its program on)."""
    env = {}
    while words and ENV_WORD.fullmatch(words[0]):
        name, _, value = words[0].strip("[]").partition("=")
        env[name] = value
        words = words[1:]
    return env, words


def _is_reference(words: list[str]) -> bool:
    """A prose mention of a command (`vilbert-ds shards build ...`, `python -m x.vcr q-ar ...`),
    not a command line: after the program (and module) only sub-command names."""
    _, cmd = _program(words)
    rest = cmd[3:] if cmd[:2] in (["python", "-m"], ["python3", "-m"]) else cmd[1:]
    return cmd[0] in ("vilbert-ds", "python", "python3") and all(re.fullmatch(r"[a-z][a-z-]*", w) for w in rest) \
        and len(rest) <= 2


def _joined(words: list[str]) -> str:
    """The words as one line the shell splits back into them (a word with spaces quoted)."""
    return " ".join(shlex.quote(w) if any(c.isspace() for c in w) else w for w in words)


def doc_commands() -> dict[str, list[str]]:
    """{command as written (words joined as the shell reads them, comments dropped): [doc:line, ...]}."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        text, name = doc.read_text(encoding="utf-8"), doc.relative_to(REPO).as_posix()
        for block in FENCE.finditer(text):
            lines = block.group(2).splitlines()
            first = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
            if block.group(1) not in ("bash", "sh", "shell", "console") and not (
                    block.group(1) == "" and _commands_in(first)):  # an untagged block of commands, not output
                continue
            line0 = text[:block.start(2)].count("\n") + 1
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):  # continuation lines
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                for words in _commands_in(line.strip()):
                    found.setdefault(_joined(words), []).append(f"{name}:{line0 + start}")
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for span in re.finditer(r"`([^`]+)`", prose):
            quoted = " ".join(span.group(1).split())
            if any(c in quoted for c in "|<>$"):  # alternatives (`a|b`), placeholders (`<flags>`), variables
                continue
            for words in _commands_in(quoted):
                more = words[-1] == "..."
                words = words[:-1] if more else words
                cmd = _program(words)[1]
                if len(cmd) < (2 if cmd[0] in ("bash", "sbatch") else 3) or words[-1] in ("-m", "--module") \
                        or (more and _is_reference(words)):
                    continue  # `deepspeed`, `torchrun -m`, `vilbert-ds shards build ...`: a program named in prose
                found.setdefault(_joined(words), []).append(f"{name}:{prose[:span.start()].count(chr(10)) + 1}")
    return found


# ============================================================================ what is run
# (group, command): a group's commands run in order in one scratch directory its setup prepared.
RUN: list[tuple[str, str]] = [
    ("convert", "vilbert-ds convert multi_task_model.bin out/12in1 --config bert_base_6layer_6conect.json"),
    ("convert", "vilbert-ds convert out/12in1 multi_task_model_again.bin"),
    ("convert", "vilbert-ds info out/12in1"),
    ("info", "vilbert-ds info base_6layer_6conect --task-tokens"),
    ("info", "vilbert-ds pretrain --help"),
    ("shards", "vilbert-ds shards synth --out syn --format tsv --images 64"),
    ("shards", "vilbert-ds shards build --format tsv --input syn/features.tsv.0 --captions syn/captions_cc.tsv "
               "--output shards/cc --prefix cc"),
    ("shards", "vilbert-ds shards verify shards/cc/manifest.json"),
    ("shards", "vilbert-ds shards inspect shards/cc/manifest.json --index 5"),
    ("cc-lmdb", "vilbert-ds shards build --format cc-lmdb --input training_feat_all.lmdb --output shards/cc"),
    ("lmdb-pickle", "vilbert-ds shards build --format lmdb-pickle --trust-pickle --input "
                    "coco/features_100/COCO_trainval_resnext152_faster_rcnn_genome.lmdb --captions caps.json "
                    "--output shards/coco"),
    ("npz", "vilbert-ds shards build --format npz --input npz_dir --captions caps.json --output shards/npz"),
    ("tasks", "python -m vilbert_ds.tasks.synthetic_qa --root syn"),
    ("tasks", "vilbert-ds shards task --task vqa --data-root syn"),
    ("tasks-data", "vilbert-ds shards task --task vqa --data-root data"),
    ("tasks-data", "vilbert-ds shards task --task gqa,nlvr2,snli_ve --data-root data"),
    ("plot", "vilbert-ds plot runs/pretrain_cc"),
    ("plot", "vilbert-ds plot runs/multitask"),
    ("python-m", "python -m vilbert_ds.ops where"),
    ("python-m", "python -m vilbert_ds.metrics flops"),
    ("python-m", "python -m vilbert_ds.metrics flops --config base_6layer_6conect"),
]
# what the docs say these print
EXPECT = {
    "vilbert-ds pretrain --help": ["section.key=value", "(default: none)"],
    "vilbert-ds info base_6layer_6conect --task-tokens": ["268,028,859", "11,020,800",
                                                          "T0..T5 ; C0 ; [T6 V0] C1 ; [T7 V1] C2"],
    "python -m vilbert_ds.metrics flops": ["47.0"],
    "vilbert-ds shards verify shards/cc/manifest.json": ["OK"],
}

_SYN = "cc-lmdb, lmdb-pickle, npz and the task writers"
NOT_RUN: dict[str, str] = {
    # the demo's models and inputs (tests/test_predict.py runs predict on a trained tiny model, every family)
    "vilbert-ds predict --model runs/demo/model --task retrieval_coco --features runs/demo/shards --caption "
    "'a picture of a pink boat' --top-k 3": "the demo's model (tests/test_predict.py ranks a shard set)",
    "vilbert-ds predict --model runs/demo/model --task retrieval_coco --features "
    "runs/demo/inputs/features.tsv.0#1117517700 --caption 'there is a purple chair and a purple cup' --caption "
    "'a picture of a pink boat' --caption 'a photo of a white clock'": "the demo's model (tests/test_predict.py reads "
                                                                        "TSV features)",
    "vilbert-ds predict --model runs/demo/tasks/run --registry runs/demo/tasks/data/tasks.yaml --task vqa --features "
    "runs/demo/tasks/data/features/coco#1060 --question 'what color is the dog?' --question 'is there a car?' "
    "--top-k 3": "the demo's task model (tests/test_predict.py)",
    "vilbert-ds predict --model runs/demo/tasks/run --registry runs/demo/tasks/data/tasks.yaml --task snli_ve "
    "--features runs/demo/tasks/data/features/flickr30k#4000 --hypothesis 'there is a red cat' --hypothesis "
    "'there is a blue cat'": "the demo's task model (tests/test_predict.py)",
    "vilbert-ds predict --model runs/demo/tasks/run --registry runs/demo/tasks/data/tasks.yaml --task nlvr2 "
    "--features runs/demo/tasks/data/features/nlvr2#dev-0-0-img0 runs/demo/tasks/data/features/nlvr2#dev-0-0-img1 "
    "--sentence 'one of the images has a red cat.'": "the demo's task model (tests/test_predict.py)",
    "vilbert-ds predict --model runs/demo/tasks/run --registry runs/demo/tasks/data/tasks.yaml --task vqa --features "
    "runs/demo/tasks/data/features/coco#1060 --question 'what color is the dog?' --json --embeddings emb/ --states":
        "the demo's task model (tests/test_predict.py)",
    "vilbert-ds shards synth --out synth --images 256 --boxes 36": "a measurement's input (the synth path runs in "
                                                                   "tests/test_shards_cli.py on fewer images)",
    "python bench/batch_mix.py --markdown": "a measurement (minutes of CPU)",
    "vilbert-ds multitask --config multitask_12in1 --deepspeed ds_configs/zero2_12in1.json":
        "the 12 tasks' data (tests/test_recipe.py loads the shipped recipe)",
    "vilbert-ds finetune --task vqa --from runs/multitask --config multitask_12in1 --deepspeed "
    "ds_configs/zero2_12in1.json": "a multi-task run and its tasks' data (tests/test_recipe.py fine-tunes a "
                                   "synthetic task)",
    # installing and the whole suite
    "python3 -m pip install torch==2.13.0": "installs packages (tests/run.sh does, before the suite)",
    "pip install torch==2.13.0": "installs packages (tests/run.sh does, before the suite)",
    "python3 -m pip install -e .[demo]": "installs packages (tests/run.sh does, before the suite)",
    "pip install -e .[lmdb]": "installs packages (the test extra includes lmdb)",
    "npm install -g s3rver@3.7.1": "installs an npm package (optional second S3 server)",
    "bash tests/run.sh": "the whole suite",
    "python -m pytest tests/test_shards.py tests/test_shards_formats.py tests/test_stream.py tests/test_s3.py":
        "these tests run in the suite",
    "vilbert-ds demo": "minutes of training (tests/test_demo.py runs it)",
    # needs a model, a run or data only a user has; the same code paths run in the named tests
    "vilbert-ds convert pretrained_model.bin out/cc --config base_6layer_6conect [--task-heads] [--allow-missing]":
        "a base-size model (1 GB of weights); the tiny convert above runs the same path (tests/test_convert.py)",
    "vilbert-ds convert multi_task_model.bin models/12in1 --config bert_base_6layer_6conect.json --label-maps "
    "data/datasets": "the original's released label maps (tests/test_released_files.py writes synthetic ones)",
    "vilbert-ds convert multi_task_model.bin DIR --config ... --label-maps DATASETS":
        "the same command as the README's, with its placeholders named",
    "vilbert-ds shards task --task vqa,gqa,genomeqa,retrieval_coco --data-root data --released data/datasets":
        "the original's released datasets (tests/test_released_files.py)",
    "vilbert-ds shards task --task vqa,gqa --released DIR": "the original's released datasets "
                                                             "(tests/test_released_files.py)",
    "vilbert-ds export runs/pretrain_cc --out models/vilbert_cc": "a training run (tests/test_train_distributed.py "
                                                                  "exports one through this command)",
    "vilbert-ds eval --task vqa --ckpt models/12in1 --split minval --out eval/": "a 12-in-1 model and VQA task shards "
                                                                                 "(tests/test_cli.py evaluates)",
    "vilbert-ds eval --task retrieval_coco --ckpt runs/finetune-retrieval_coco --split test --out eval/":
        "a fine-tuned model and COCO task shards (tests/test_task_retrieval_engine.py)",
    "vilbert-ds eval --task retrieval_coco --ckpt models/12in1 --split test --protocol paper --out eval/":
        "a 12-in-1 model and COCO task shards (tests/test_task_retrieval.py)",
    "vilbert-ds eval --task retrieval_flickr30k --ckpt models/pretrained --zero-shot --out eval/":
        "a pretrained model and Flickr30k task shards (tests/test_task_retrieval_engine.py)",
    "python -m vilbert_ds.tasks.vcr q-ar --qa eval/vcr_q_a_val_predictions.json --qar eval/vcr_qa_r_val_predictions.json "
    "--annotations data/annotations/vcr/val.jsonl": "VCR predictions and annotations (tests/test_task_vcr.py)",
    "python -m vilbert_ds.tasks.vcr leaderboard --qa eval/vcr_q_a_test_predictions.json --qar "
    "eval/vcr_qa_r_test_predictions.json --out vcr_test.csv": "VCR test predictions (tests/test_task_vcr.py)",
    "python -m vilbert_ds.tasks.synthetic_qa --root DIR": "the same command as `--root syn`, which runs",
    "python -m vilbert_ds.tasks.synthetic_scenes --root DIR --tasks refcoco,visual7w --train-steps N":
        "trains a model per task (minutes); tests/test_task_refer.py and test_task_pointing.py",
    "python -m vilbert_ds.tasks.synthetic_scenes --root DIR --tasks refcoco,visual7w,...":
        "trains a model per task (minutes); tests/test_task_refer.py and test_task_pointing.py",
    "python -m vilbert_ds.ops build": "builds DeepSpeed's CPU ops (47 s on a fresh machine; tests/run.sh runs it "
                                      "before the suite)",
    # training: GPUs, minutes (tests/test_train_distributed.py, test_multitask.py run the entry points)
    "deepspeed --num_gpus 8 --module vilbert_ds.pretrain --config pretrain_cc --deepspeed ds_configs/zero2.json "
    "data.train=s3://bucket/cc/manifest.json data.vocab=/models/bert-base-uncased "
    "model.init_text_from=/models/bert-base-uncased": "8 GPUs",
    "vilbert-ds pretrain --config run.yaml --deepspeed ds_configs/cpu_small.json train.total_steps=100 "
    "ds.zero_optimization.stage=2": "trains (100 updates)",
    "vilbert-ds pretrain --config run.yaml --deepspeed ds_configs/zero2.json --resume auto": "trains",
    "deepspeed --num_gpus 8 --module vilbert_ds.multitask --config multitask_12in1 --deepspeed ds_configs/zero2.json "
    "model.init_from=models/pretrained tasks.data_root=data ds.optimizer.params.lr=2e-5": "8 GPUs and the 12 tasks' data",
    "vilbert-ds multitask --tasks vqa,gqa,nlvr2 --config multitask_12in1 --deepspeed ds_configs/cpu_small.json":
        "trains on the tasks' data",
    "vilbert-ds finetune --task vqa --from runs/multitask --deepspeed ds_configs/zero2.json": "trains from a run",
    "torchrun --nproc_per_node 4 -m vilbert_ds.evaluate --task vqa --ckpt runs/finetune-vqa --split test --out eval/":
        "4 ranks, a model and VQA task shards (tests/test_cli.py evaluates under a launcher)",
    # launchers and clusters (tests/test_launch_scripts.py, test_multinode.py, test_slurm.py start them)
    "NUM_GPUS=8 bash launch/single_node.sh train.total_steps=100000": "8 GPUs",
    "HOSTFILE=hosts MASTER_ADDR=node1 bash launch/multi_node.sh": "nodes over ssh (tests/test_multinode.py)",
    "NNODES=4 RDZV_ENDPOINT=node1:29400 bash launch/torchrun.sh": "4 nodes (tests/test_multinode.py)",
    "[ENTRY=multitask] sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/train.sbatch":
        "a SLURM cluster with GPUs (tests/test_slurm.py submits it to a local cluster)",
    "SLICES=16 bash slurm/shards.sh --format tsv --input feats/*.tsv --captions cc.tsv --output s3://bucket/cc":
        "a SLURM cluster and a bucket (tests/test_slurm.py runs it on a local cluster)",
    "scancel --signal=USR1 JOBID": "a running SLURM job (tests/test_slurm.py sends it)",
    # benchmarks: minutes, some on a GPU (tests/test_bench_smoke.py runs their quickest paths)
    "python bench/tasks_region_dependence.py --out /tmp/rd_bench": "a benchmark (7 minutes)",
    "python bench/run.py --quick": "a benchmark (5 minutes)",
    "python bench/run.py --quick --gpu": "a GPU benchmark",
    "python bench/run.py --quick --update-doc docs/PERFORMANCE.md": "a benchmark that rewrites the doc",
    "python bench/run.py --update-doc docs/PERFORMANCE.md": "a benchmark that rewrites the doc",
    "python bench/run.py --quick --gpu --update-doc docs/PERFORMANCE.md": "a GPU benchmark",
    "python bench/run.py --gpu --from-json OUT/bench.json OUT/runs.json OUT/compile.json --update-doc "
    "docs/PERFORMANCE.md": "the result files of a GPU session",
    "python bench/run.py --quick --gpu --skip-variants compile --only model_step vs_plain scaling --markdown --json "
    "/root/out/bench.json": "a GPU benchmark",
    "python bench/train_runs.py --pretrain /tmp/gpu_session/runs/pretrain --multitask /tmp/gpu_session/runs/multitask "
    "--markdown --json /root/out/runs.json": "the runs of a GPU session",
    "python bench/train_runs.py --multitask /tmp/gpu_session/runs/multitask_zero1_12in1 "
    "/tmp/gpu_session/runs/multitask_zero2_12in1 --markdown --json /root/out/runs.json": "the runs of a GPU session",
    "DS_ACCELERATOR=cuda python -m pytest tests/test_recipe.py -k 'reference and fused'":
        "needs a GPU (on the CPU accelerator these tests run in the suite)",
    "python bench/data_encodings.py --learning": "a measurement (minutes of training per encoding)",
    "python -m vilbert_ds.tasks.synthetic_scenes --root DIR --tasks refcoco,visual7w,retrieval_coco,vcr_q_a --images 40 "
    "--train-steps 400 --deepspeed ds_configs/zero2_12in1.json": "a learning check (minutes of training per task)",
    "python bench/data_encodings.py --no-encodings --topk-from shards/cc/manifest.json":
        "a user's float16 shard set (the sweep runs on synthetic data in bench/data_encodings.py)",
    "python bench/model_step.py --quick": "a benchmark",
    "python bench/vs_plain.py --quick": "a benchmark",
    "python bench/data_bench.py --quick": "a benchmark",
    "python bench/model_step.py --gpu --configs base_6layer_6conect --shapes pretrain --variants baseline bf16 compile "
    "--markdown --json /root/out/compile.json": "a GPU benchmark",
    "python bench/model_step.py --gpu --configs base_6layer_6conect --shapes pretrain vqa --variants baseline bf16 "
    "--batch 256 --budget 6 --base-optimizer torch_fused --markdown --json /root/out/b256.json": "a GPU benchmark",
    "python bench/model_step.py --gpu --configs base_6layer_6conect --shapes pretrain vqa --variants baseline bf16 "
    "--batch 512 --budget 6 --base-optimizer torch_fused --markdown --json /root/out/b512.json": "a GPU benchmark",
    "bash bench/gpu_session.sh prepare": "a GPU session",
    "bash bench/gpu_session.sh": "a GPU session",
    "bash bench/gpu_profile.sh": "a GPU profile",
}
assert not {cmd for _, cmd in RUN} & set(NOT_RUN), "a command is both run and listed"


# ============================================================================ running one
def _capture(fn) -> tuple[int, str]:
    """Run fn() with stdout and stderr captured (file descriptors too); (exit status, output)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        status = 0
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                try:
                    status = int(fn() or 0)
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except Exception as e:  # noqa: BLE001 - reported as the command's failure, with the error
                    import traceback

                    traceback.print_exc()
                    status = 1
                    del e
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        sink.seek(0)
        return status, sink.read()


def _python_entry(words: list[str]) -> tuple[str, str, list[str]]:
    """("module" | "path", what, arguments) of a `python -m X ...` / `python FILE ...` line."""
    if words[1] == "-m":
        return "module", words[2], words[3:]
    return "path", words[1], words[2:]


def run_command(command: str) -> tuple[int, str]:
    """Run one documented command in the current directory, in this process."""
    words = shlex.split(command)
    if words[0] == "vilbert-ds":
        from vilbert_ds.cli import main

        return _capture(lambda: main(words[1:]))
    kind, what, args = _python_entry(words)
    saved = sys.argv

    def call():
        sys.argv = [what, *args]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" for an imported module
                if kind == "module":
                    runpy.run_module(what, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(REPO / what), run_name="__main__")
        finally:
            sys.argv = saved

    return _capture(call)


# ============================================================================ placeholders
def _tiny_original_checkpoint(d: Path) -> None:
    """`multi_task_model.bin` (the original's state-dict layout) and `bert_base_6layer_6conect.json`
    (the original's config format), of a tiny model: what the README's convert lines read."""
    import torch

    from vilbert_ds import build_model, to_original

    torch.manual_seed(0)
    model = build_model("tiny", task_specific_tokens=True)
    torch.save(to_original(model), d / "multi_task_model.bin")
    model.config.to_json(d / "bert_base_6layer_6conect.json")


def _synthetic(fmt: str, d: Path) -> dict:
    from vilbert_ds.data import synthetic

    spec = synthetic.SyntheticSpec(num_images=12, num_boxes=6)
    writer = {"cc-lmdb": synthetic.write_cc_lmdb, "lmdb-pickle": synthetic.write_pickle_lmdb,
              "npz": synthetic.write_npz}[fmt]
    return writer(str(d), spec)


def _lmdb_pickle(d: Path) -> None:
    made = _synthetic("lmdb-pickle", d / "in")
    target = d / "coco" / "features_100" / "COCO_trainval_resnext152_faster_rcnn_genome.lmdb"
    target.parent.mkdir(parents=True)
    os.rename(made["features"][0], target)
    os.rename(made["captions_json"], d / "caps.json")


def _npz(d: Path) -> None:
    made = _synthetic("npz", d / "in")
    os.rename(made["features"][0], d / "npz_dir")
    os.rename(made["captions_json"], d / "caps.json")


def _task_data(d: Path) -> None:
    from vilbert_ds.tasks.synthetic_qa import SyntheticTaskSpec, make_synthetic_tasks

    make_synthetic_tasks(d / "data", ["vqa", "gqa", "nlvr2", "snli_ve"], SyntheticTaskSpec(images=6))


def _runs(d: Path) -> None:
    """Two run directories with a few metrics rows each (what `vilbert-ds plot` reads)."""
    for run, keys in (("pretrain_cc", ("train/loss", "train/alignment_acc", "opt/lr")),
                      ("multitask", ("train/vqa/loss", "train/vqa/score", "val/vqa/score", "sampler/vqa/prob"))):
        (d / "runs" / run).mkdir(parents=True)
        rows = [{"step": s, **{k: 1.0 / s for k in keys}} for s in range(1, 6)]
        (d / "runs" / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


SETUP = {
    "convert": _tiny_original_checkpoint,
    "cc-lmdb": lambda d: _synthetic("cc-lmdb", d),  # writes training_feat_all.lmdb
    "lmdb-pickle": _lmdb_pickle,
    "npz": _npz,
    "tasks-data": _task_data,
    "plot": _runs,
}
GROUPS = list(dict.fromkeys(group for group, _ in RUN))


def _scratch(tmp_path: Path) -> Path:
    """A directory laid out like the repository root (the docs' commands run from there)."""
    for name in ("ds_configs",):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


# ============================================================================ tests
def test_every_documented_command_is_run_or_listed():
    found = doc_commands()
    known = {cmd for _, cmd in RUN} | set(NOT_RUN)
    new = {cmd: where for cmd, where in found.items() if cmd not in known}
    assert not new, "documented commands neither run nor listed in tests/test_readme_commands.py:\n" + "\n".join(
        f"  {where[0]}: {cmd}" for cmd, where in new.items())
    stale = sorted(known - set(found))
    assert not stale, f"listed here but no longer in the docs: {stale}"
    assert len(found) >= 60  # the extraction itself still works


@pytest.mark.parametrize("group", GROUPS)
def test_documented_commands_run_as_written(group, tmp_path, monkeypatch):
    where = doc_commands()
    d = _scratch(tmp_path)
    monkeypatch.chdir(d)
    if group in SETUP:
        SETUP[group](d)
    for g, command in RUN:
        if g != group:
            continue
        status, out = run_command(command)
        assert status == 0, f"{where.get(command, ['?'])[0]}: `{command}` exited {status}:\n{out[-3000:]}"
        for text in EXPECT.get(command, []):
            assert text in out, f"{where.get(command, ['?'])[0]}: `{command}` does not print {text!r}:\n{out[-3000:]}"


def _options(words: list[str]) -> list[str]:
    return sorted({w.split("=", 1)[0] for w in words if w.startswith("--")})


def _unwrap_optional(words: list[str]) -> list[str]:
    """`[--task-heads]`, `[--out PNG]` (optional parts) as plain words."""
    return shlex.split(re.sub(r"\[(-[^\]]*)\]", r"\1", _joined(words)))


def _check_vilbert_ds(words: list[str], world_size: int = 1) -> None:
    """Parse with the command's own parser; a training line also loads its config and checks its
    DeepSpeed config for `world_size` ranks, as the run would before starting."""
    from vilbert_ds.cli import parse

    args = parse(words[0], _unwrap_optional(words[1:]))
    if words[0] not in TRAINING:
        return
    from vilbert_ds.config import TrainConfig, split_overrides
    from vilbert_ds.engine import load_ds_config, validate_ds_config
    from vilbert_ds.train import resolve_tasks

    kind = words[0]
    train_overrides, ds_overrides = split_overrides(args.overrides)
    above = [f"model.init_from={args.init_from}"] if kind == "finetune" else []
    cfg = TrainConfig.load(args.config, above + train_overrides, kind=kind)
    validate_ds_config(load_ds_config(args.deepspeed, ds_overrides), source=args.deepspeed, world_size=world_size)
    if kind != "pretrain":
        resolve_tasks(cfg, getattr(args, "tasks", None) or getattr(args, "task", None))


def _check_help_names_options(words: list[str]) -> None:
    """`python -m X [sub] --help` / `python FILE --help` names every option the line uses."""
    kind, what, args = _python_entry(words)
    subcommands = []
    for a in args:
        if a.startswith("-"):
            break
        subcommands.append(a)
    status, out = run_command(" ".join([words[0], *(["-m", what] if kind == "module" else [what]), *subcommands,
                                         "--help"]))
    assert status == 0, out[-2000:]
    missing = [o for o in _options(args) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", out)]
    assert not missing, f"options not in its --help: {missing}\n{out[-2000:]}"


def _check_script(env: dict[str, str], words: list[str]) -> None:
    """The script exists, parses, and its header documents every variable the line sets."""
    script = next(REPO / w for w in words[1:] if w.endswith((".sh", ".sbatch")))
    assert script.is_file(), f"{script} does not exist"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    header = script.read_text().split("set -euo pipefail")[0]
    undocumented = [v for v in env if not re.search(rf"^#\s+{v}\b", header, re.M)]
    assert not undocumented, f"{script.name} does not document {undocumented}"


def check_not_run(command: str) -> None:
    env, words = _program(shlex.split(command))
    program = words[0]
    if program == "vilbert-ds":
        _check_vilbert_ds(words[1:])
    elif program == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        ds = parse_args(words[1:])
        assert ds.module, "the deepspeed launcher runs a module with --module (not -m)"
        kind = ds.user_script.rsplit(".", 1)[-1]
        _check_vilbert_ds([kind, *ds.user_args], world_size=ds.num_gpus if ds.num_gpus > 0 else 1)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        tr = get_args_parser().parse_args(words[1:])
        assert tr.module, "torchrun runs a module with -m"
        name = {"evaluate": "eval"}.get(tr.training_script.rsplit(".", 1)[-1], tr.training_script.rsplit(".", 1)[-1])
        _check_vilbert_ds([name, *tr.training_script_args], world_size=int(tr.nproc_per_node))
    elif program in ("python", "python3") and words[1] != "-m" or words[1:3] == ["-m", "vilbert_ds.tasks.vcr"] \
            or (words[1] == "-m" and words[2].startswith("vilbert_ds.")):
        if words[1] == "-m" and words[2] in ("vilbert_ds.pretrain", "vilbert_ds.multitask", "vilbert_ds.finetune",
                                             "vilbert_ds.evaluate"):
            _check_vilbert_ds([{"evaluate": "eval"}.get(words[2][11:], words[2][11:]), *words[3:]])
        elif words[1:3] != ["-m", "pytest"]:
            _check_help_names_options(words)
    elif program in ("bash", "sbatch") and any(w.endswith((".sh", ".sbatch")) for w in words):
        _check_script(env, words)


@pytest.mark.parametrize("command", sorted(NOT_RUN))
def test_documented_commands_not_run_still_parse(command, tmp_path, monkeypatch):
    """Each listed command as far as it can be checked without running it (module docstring)."""
    d = _scratch(tmp_path)
    monkeypatch.chdir(d)
    # the user's YAML: the packaged recipe plus the user's shards
    (d / "run.yaml").write_text((REPO / "vilbert_ds" / "configs" / "pretrain_cc.yaml").read_text()
                                .replace('train: ""', "train: shards/cc/manifest.json", 1))
    try:
        check_not_run(command)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - argparse exits; every failure names the command
        where = doc_commands().get(command, ["?"])[0]
        pytest.fail(f"{where}: `{command}` ({NOT_RUN[command]}): {type(e).__name__}: {e}", pytrace=False)


# presets -> the kinds of run that use them; a new preset must be added here
PRESET_KINDS = {"pretrain_cc": ("pretrain",), "demo": ("pretrain",), "multitask_12in1": ("multitask", "finetune")}


def _preset_header(path: Path) -> str:
    """The comment lines a preset starts with, continuation lines joined."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))


@pytest.mark.parametrize("preset", sorted(PRESET_KINDS))
def test_every_packaged_preset_loads_with_its_documented_overrides(preset, tmp_path, monkeypatch):
    """Each packaged preset loads for every kind of run that uses it, with the overrides its header
    documents; the commands its header shows parse and load (placeholders `<...>` filled in)."""
    from vilbert_ds.config import PACKAGED_CONFIGS, TrainConfig

    presets = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml") if p.stem != "tasks")
    assert presets == sorted(PRESET_KINDS), "a packaged preset without its kinds in PRESET_KINDS"
    monkeypatch.chdir(_scratch(tmp_path))
    header = _preset_header(PACKAGED_CONFIGS / f"{preset}.yaml")
    documented = [w for w in re.findall(r"(?<![\w.])[a-z_]+(?:\.[a-z_]+)+=[^\s`,;)]+", header)
                  if not w.startswith("ds.") and "<" not in w]
    for kind in PRESET_KINDS[preset]:
        needed = ["data.train=shards/cc/manifest.json"] if kind == "pretrain" else []  # set by every user
        assert TrainConfig.load(preset, [*needed, *documented], kind=kind).kind == kind
    commands = [re.sub(r"<[^>]+>", "models/pretrained", m.group(0)) for line in header.splitlines()
                for m in [re.search(r"(?<![`\w])vilbert-ds \w.*", line)] if m]  # `vilbert-ds demo` in prose: no
    assert commands or preset == "demo", "the header shows no command"  # the demo command fills demo.yaml in
    for command in commands:
        _check_vilbert_ds(shlex.split(command)[1:])
