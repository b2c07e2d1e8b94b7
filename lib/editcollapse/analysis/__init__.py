"""Analyses: the pilot observation's statistics, key distributions (Fall of ROME)."""
