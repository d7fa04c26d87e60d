"""The FastAPI prediction service: hot swap, dynamic batching, metrics and admin."""
