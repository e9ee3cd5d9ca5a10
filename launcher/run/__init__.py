"""Starting and watching a run from the launcher's side: the verbs behind the CLI, preflight (run
directory, tokenizer, resume checks), torchrun on this machine, Slurm and requeue, progress, the
token cache. Light: no torch at module level."""
