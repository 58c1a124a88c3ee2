"""seer.evaluation."""
