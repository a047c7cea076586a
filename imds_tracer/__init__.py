"""imds-tracer: find the processes that read the instance metadata service in normal mode."""
__version__ = "0.1.0"
