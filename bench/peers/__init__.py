"""One adapter module per library; each runs one workload in its own process."""
