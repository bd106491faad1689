"""streammem.eval."""
