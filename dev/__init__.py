"""Development tools, kept out of the runtime image: the native cluster, the local EC2, the demo seed."""
