#!/usr/bin/env python3
"""Write synthetic learnable region features in a real input format (same as `vilbert-ds shards synth`).

    python shards/synth.py --help
"""
import sys

from vilbert_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "synth", *sys.argv[1:]]))
