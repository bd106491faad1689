"""streammem.train."""
