"""Benchmarks: asyncjobs side by side with other Python job queues (see run_all.py)."""
