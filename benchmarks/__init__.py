"""Benchmarks of the companion package (not part of the installed ``bnn_course`` package)."""
