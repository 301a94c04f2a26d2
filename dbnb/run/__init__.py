"""A run's folder on disk: its layout, the lock that keeps two processes out of it, and the checkpoints it saves and resumes from."""
