"""The one training loop, checkpoints + EMA + resume, history."""
