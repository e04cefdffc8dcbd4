"""stackwatch.daemon: the service (watcher, catalogue, queue, pipeline driver, checkpoints) and the CLI."""
