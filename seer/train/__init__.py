"""seer.train."""
