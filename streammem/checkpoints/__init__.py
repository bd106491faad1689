"""streammem.checkpoints."""
