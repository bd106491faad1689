"""streammem.memory."""
