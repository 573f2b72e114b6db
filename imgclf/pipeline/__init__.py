"""The DVC stages, one module each: pure functions plus a short ``main``."""
