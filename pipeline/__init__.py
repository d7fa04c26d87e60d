"""streamfit core library: settings, events, Kafka, broker, models, registry, parameter server, Spark I/O."""

__version__ = "0.1.0"
