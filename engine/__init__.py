"""Config loading, training/evaluation loops, distributed setup, checkpoints."""
