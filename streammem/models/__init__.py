"""streammem.models."""
