"""Shards on disk and the streaming loader that feeds the trainer."""
