"""A connection worker process: one broker connection, its heartbeats and prechannels."""
