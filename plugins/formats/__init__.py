"""Built-in checkpoint formats."""
