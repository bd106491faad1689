"""streammem.io."""
