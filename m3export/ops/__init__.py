"""Custom ops (eager + fake implementations) and their lowerings."""
