"""The shared run stack: config, data, trainer, backends, checkpoints, export, logging."""
