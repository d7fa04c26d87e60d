"""Spark glue: the session, the Python Kafka data source, and its offsets model."""
