"""Evaluation: prompt suites, targets and best-checkpoint selection, the comparison page."""
