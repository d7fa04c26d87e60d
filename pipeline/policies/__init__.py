"""The streaming training consumer's policies, one module each and free of Spark and Kafka, so each is
tested on its own: :mod:`~pipeline.policies.prequential` (test-then-train scoring and drift),
:mod:`~pipeline.policies.drift_boost` (how training reacts to drift) and
:mod:`~pipeline.policies.promotion` (when a candidate becomes champion). The consumer composes them."""
