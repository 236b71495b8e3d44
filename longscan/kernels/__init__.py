"""Single-device compute. Nothing here imports torch.distributed."""
