"""The ML core and the stage directory: typed stage specs, models, objectives, data, the training loop, checkpoints,
and what a stage writes to disk. Imports nothing of the layers above it (plan, bench, report, run)."""
