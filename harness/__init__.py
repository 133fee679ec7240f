"""DMAE reproducibility harness."""
