"""Evaluation: exact kNN retrieval at scale and the paper's retrieval metrics."""
