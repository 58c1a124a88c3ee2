"""seer.ssl."""
