"""Performance benchmarks: each compares seer with the reference library side by side in one run."""
