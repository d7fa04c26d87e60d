"""Spark Structured Streaming jobs: the inference consumer and the training consumer."""
