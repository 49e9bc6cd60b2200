"""Benchmarks: one module each (load, prompt, extract, score)."""
