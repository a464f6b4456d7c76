"""Shards, streaming loader, masking and collate."""
