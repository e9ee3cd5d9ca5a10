"""The run directory on disk: its layout (every path named once), checkpoints as files, the run
lock, heartbeats, the metrics log reader. Light: no torch."""
