"""What a plan will cost before it runs: model-state bytes, activation memory, FLOPs. Light: no torch."""
