"""The bottom layer: settings, the one error tree, logging, tracing, the Redis client and its
pipelined connection, GC tuning. Imports nothing else of ours (tests/test_layers.py)."""
