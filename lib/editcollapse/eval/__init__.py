"""Evaluation: teacher-forced scoring, edit metrics, ME-PPL perplexity, downstream tasks."""
