"""What the allocator and the cloud worker share: address families, the pool arithmetic, the
reasons, the Redis stream and key contract between the two processes, the Redis connection
factory and asyncio helpers. The core imports neither service; both services import it."""
