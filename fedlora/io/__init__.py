"""Input and output: the wire format, checkpoints, run folders, reports, export and the agent's state on disk."""
