"""Cloud providers of the worker: the `CloudProvider` interface and its implementations."""
