"""The worker process that torchrun starts: the training loop, data, models, backends, checkpointer, metrics, export. The only place torch is imported at module level."""
