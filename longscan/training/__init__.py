"""Training: config, data, optimizer, checkpoints, metrics and the loop (one process per rank)."""
