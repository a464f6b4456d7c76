#!/usr/bin/env python3
"""Verify every shard of a manifest; exit 1 on any problem (same as `vilbert-ds shards verify`).

    python shards/verify.py --help
"""
import sys

from vilbert_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "verify", *sys.argv[1:]]))
