#!/usr/bin/env python3
"""Write manifest.json once all shards of a (sliced) build exist (same as `vilbert-ds shards manifest`).

    python shards/manifest.py --help
"""
import sys

from vilbert_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "manifest", *sys.argv[1:]]))
