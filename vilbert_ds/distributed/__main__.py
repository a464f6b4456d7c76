"""`python -m vilbert_ds.distributed hostfile-env | show`: launch helpers."""
from __future__ import annotations

import sys
from pathlib import Path

from .env import DistEnv, write_hostfile_env


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.distributed", description="launch helpers")
    sub = parser.add_subparsers(dest="action", required=True)
    h = sub.add_parser("hostfile-env", help="write .deepspeed_env + the venv script; print the script's path")
    h.add_argument("--env-file", default=".deepspeed_env", help="where the deepspeed launcher will read it (DS_ENV_FILE)")
    sub.add_parser("show", help="print this process's DistEnv")
    args = parser.parse_args(argv)
    if args.action == "hostfile-env":
        print(write_hostfile_env(Path(args.env_file)))
    else:
        print(DistEnv.from_env().describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
