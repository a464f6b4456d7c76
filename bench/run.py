"""The benchmark suite in one command: every figure of the performance issue this machine can
give, as tables whose ratios are taken inside this one run.

    python bench/run.py --quick                       # CPU, under 5 minutes on 2 quiet cores
    python bench/run.py                               # full CPU run (6layer_6conect, compile, cold starts)
    python bench/run.py --quick --gpu                 # + the GPU figures (TFLOP/s, MFU) on a CUDA device
    python bench/run.py --quick --markdown            # the tables as Markdown
    python bench/run.py --quick --update-doc docs/PERFORMANCE.md   # regenerate the doc's tables in place
    python bench/run.py --only model_step vs_plain    # a subset (names below)
    python bench/run.py --gpu --from-json out/bench.json out/runs.json --update-doc docs/PERFORMANCE.md
                                                      # the doc's GPU block from results saved elsewhere
                                                      #   (a lent GPU machine: bench/gpu_session.sh)

Questions and their own commands: model_step (Q1), vs_plain (Q2), zero (Q3), data (Q4, with
bench/data_bench.py), startup (Q5), scaling (Q6). --update-doc replaces the block between
`<!-- bench:cpu:begin -->` and `<!-- bench:cpu:end -->` (`bench:gpu:` with --gpu; `bench:cpu-full:`
for a full CPU run) and leaves the rest of the file alone. --from-json measures nothing: it renders
the tables of result files written with --json (this command's, bench/model_step.py's,
bench/train_runs.py's); tables of the same title are merged, a later file adding the rows whose
key (the text and integer columns: config, shape, batch, variant) is new.
"""
from __future__ import annotations

import argparse
import io
import re
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import model_step  # noqa: E402

QUESTIONS = ("model_step", "vs_plain", "zero", "data", "startup", "scaling")


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_suite(quick: bool, gpu: bool, only: tuple[str, ...] = QUESTIONS, s3: bool = True, *,
              configs: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
              base_optimizer: str = "fused_adam") -> tuple[list[C.Table], C.Table]:
    """All tables, plus a timing table of the suite itself. `configs`, `skip` and `base_optimizer`
    go to the model-step and vs-plain questions (bench/model_step.py `run`)."""
    import scaling
    import startup
    import vs_plain

    tables: list[C.Table] = []
    spent = C.Table("Suite: time per question (wall; CPU = user + system of this process and its launches)",
                    ["question", "wall s", "CPU s"])

    def timed(name: str, fn):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn()
        spent.add(question=name, **{"wall s": time.perf_counter() - t0, "CPU s": _cpu_seconds() - c0})
        return out

    rates: dict[str, float] = {}
    gpu_rate = None
    if "model_step" in only:
        # With both questions selected, the plain step is timed inside the model-step groups (one
        # build of each vilbert-ds engine serves both tables).
        both = "vs_plain" in only
        q1 = timed("Q1 model_step" + (" + Q2 vs_plain" if both else ""),
                   lambda: model_step.run(quick, gpu, configs=configs, with_plain=both, skip=skip,
                                          base_optimizer=base_optimizer))
        tables += q1
        for row in q1[0].rows:
            if row["config"] == "6layer_6conect" and row["shape"].startswith("pretrain"):
                if gpu and row["variant"] == "bf16":
                    gpu_rate = row["samples/s"]
                elif not gpu and row["variant"] == "baseline":
                    rates["CPU measured here (fp32, batch %d, Q1)" % row["batch"]] = row["samples/s"]
        if gpu and gpu_rate:
            rates["GPU measured (bf16, Q1)"] = gpu_rate
    if "vs_plain" in only and "model_step" not in only:
        tables += timed("Q2 vs_plain", lambda: vs_plain.run(quick, gpu, configs=configs))
    if "zero" in only:
        import zero

        tables += timed("Q3 zero", lambda: zero.run(quick))
    runs_done: dict = {}
    q5: list[C.Table] = []
    if "startup" in only or "data" in only:
        import runs

        root = runs.scratch_dir()  # shards and run directories shared by Q5 and Q4, removed after
        try:
            manifest = runs.prepare_shards(root)
            if "startup" in only:
                q5, runs_done = timed("Q5 startup", lambda: startup.run(quick, root=root, manifest=manifest))
            if "data" in only:
                import data_wait

                label = "GPU measured, base model bf16 (Q1)" if gpu_rate else None
                tables += timed("Q4 data", lambda: data_wait.run(quick, s3=s3, root=root, manifest=manifest,
                                                                  results=runs_done, gpu_samples_per_s=gpu_rate,
                                                                  gpu_label=label))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    tables += q5
    if "scaling" in only:
        tables += timed("Q6 scaling", lambda: scaling.run(samples_per_s=rates))
    return tables, spent


def merge_results(paths: list[str]) -> tuple[dict, str, list[C.Table]]:
    """(machine of the first file, the files' commands joined, their tables merged by title).

    A note that a later file adds to a table an earlier file began speaks for that file's rows
    only, and says so (`rows from b512.json: ...`). Merged rows are ordered by config, shape and
    batch where the table has those columns (a file's own order otherwise)."""
    info, commands, merged = None, [], {}
    for path in paths:
        machine, command, tables = C.load_json(path)
        info = info or machine
        if command not in commands:
            commands.append(command)
        for table in tables:
            began = table.title not in merged
            into = merged.setdefault(table.title, C.Table(table.title, table.columns, notes=list(table.notes)))
            keys = {_row_key(into, r) for r in into.rows}
            into.rows += [r for r in table.rows if _row_key(into, r) not in keys]
            for note in table.notes:
                if note not in into.notes and not began:
                    note = f"rows from {Path(path).name}: {note}"
                if note not in into.notes:
                    into.notes.append(note)
    for table in merged.values():
        order = [c for c in ("config", "shape", "batch") if c in table.columns]
        table.rows.sort(key=lambda r: tuple((0, r[c]) if r.get(c) is not None else (1, 0) for c in order))
    return info, "`; `".join(commands), list(merged.values())


def _row_key(table: C.Table, row: dict) -> tuple:
    """What identifies a row: its text and integer cells (config, shape, batch, variant, ...)."""
    return tuple(row.get(c) for c in table.columns
                 if isinstance(row.get(c), (str, int)) and not isinstance(row.get(c), bool))


def update_doc(path: Path, block: str, marker: str) -> None:
    """Replace the text between the begin/end markers of `marker` in `path`."""
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- bench:{marker}:begin -->", f"<!-- bench:{marker}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {begin} ... {end} block to replace")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{block.rstrip()}\n{end}", text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the < 5 minute CPU selection")
    parser.add_argument("--gpu", action="store_true", help="add the GPU figures (needs a CUDA device)")
    parser.add_argument("--only", nargs="*", choices=QUESTIONS, default=list(QUESTIONS))
    parser.add_argument("--configs", nargs="*", choices=C.MODEL_CONFIGS,
                        help="model configs of the model-step and vs-plain questions (default: the plan's)")
    parser.add_argument("--skip-variants", nargs="*", default=[], choices=model_step.Q1_VARIANTS,
                        help="model-step variants to leave out (e.g. compile, measured in a call of its own)")
    parser.add_argument("--base-optimizer", choices=model_step.BASE_OPTIMIZERS, default="fused_adam",
                        help="torch_fused: torch.optim.AdamW(fused=True) where DeepSpeed FusedAdam cannot be built")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="measure nothing: render (and --update-doc) the tables of these result files")
    parser.add_argument("--no-s3", action="store_true", help="skip the local S3 endpoint in the data question")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--update-doc", metavar="PATH", help="write the Markdown tables into PATH between markers")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.from_json:
        info, command, tables = merge_results(args.from_json)
        return output(args, tables, info, command)
    C.setup_env(gpu=args.gpu)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench/run.py --gpu: no CUDA device here", file=sys.stderr)
            return 2
    info = C.machine()
    command = C.command_line()
    start = time.perf_counter()
    tables, spent = run_suite(args.quick, args.gpu, tuple(args.only), s3=not args.no_s3,
                              configs=tuple(args.configs) if args.configs else None,
                              skip=tuple(args.skip_variants), base_optimizer=args.base_optimizer)
    spent.add(question="total", **{"wall s": time.perf_counter() - start,
                                   "CPU s": sum(r["CPU s"] for r in spent.rows)})
    tables.append(spent)
    return output(args, tables, info, command)


def output(args: argparse.Namespace, tables: list[C.Table], info: dict, command: str) -> int:
    """Print the tables; update the doc block and write the JSON when asked."""
    C.print_tables(tables, markdown=args.markdown, info=info, command=command)
    if args.update_doc:
        buf = io.StringIO()
        C.print_tables(tables, markdown=True, info=info, command=command, file=buf)
        marker = "gpu" if args.gpu else ("cpu" if args.quick else "cpu-full")
        update_doc(Path(args.update_doc), buf.getvalue(), marker)
        print(f"updated {args.update_doc} ({marker} block)", file=sys.stderr)
    if args.json:
        C.save_json(args.json, tables, info, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
