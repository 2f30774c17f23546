"""Training: optimizers, schedules, EMA and the training loop."""
