#!/usr/bin/env python3
"""Build WebDataset feature shards (same as `vilbert-ds shards build`).

    python shards/build.py --help
"""
import sys

from vilbert_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
