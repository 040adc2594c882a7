"""Training on the DeepSpeed engine (see trainer.run)."""
