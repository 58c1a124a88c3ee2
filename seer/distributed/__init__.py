"""seer.distributed."""
