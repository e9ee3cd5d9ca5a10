"""The run directory on disk: its layout, checkpoints as files, the run lock, heartbeats, the metrics log. Light: no torch."""
