"""streammem.world."""
