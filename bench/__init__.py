"""Benchmarks and checks that run the real services: the demo, greedy equality on Spec-Bench."""
