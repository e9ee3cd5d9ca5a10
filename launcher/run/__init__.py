"""Starting and watching a run from the launcher's side: torchrun locally, Slurm, requeue, progress, the tokenizer cache built before workers start. Light: no torch at module level."""
