"""streammem.memory.presses."""
