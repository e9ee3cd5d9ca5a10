"""The worker process that torchrun starts: the training loop, ranks, data, models, precision,
backends, checkpointer, metrics, x-ray and export. The only package that imports torch at module level."""
