"""Experiments: single edits, sequential edits, sweeps on Ray."""
