"""Training building blocks used by megamoe/train.py: config, LR schedule, metrics, monitor, checkpointing."""
