"""One settings object for every streamfit component.

Precedence, highest first: CLI flags (passed as keyword overrides), environment
variables ``STREAMFIT_*``, the YAML file named by ``STREAMFIT_CONFIG`` (or
``--config``), then the defaults below. A bad value or an unknown ``STREAMFIT_*``
variable stops the program at start with a message naming the setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import StreamfitError
from pipeline.kafka_properties import KafkaProperties
from pipeline.ps.encoding import Encoding

ENV_PREFIX = "STREAMFIT_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
KAFKA_ENV = ENV_PREFIX + "KAFKA__"
"""``STREAMFIT_KAFKA__SSL_CAFILE=/ca.pem`` sets the Kafka client property ``ssl.cafile``."""


class SettingsError(StreamfitError, ValueError):
    """A setting is missing, malformed or unknown; the message names it."""


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``STREAMFIT_CONFIG``; keys are setting names."""

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"{CONFIG_ENV}={path}: cannot read the file ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise SettingsError(f"{CONFIG_ENV}={path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"{CONFIG_ENV}={path}: the file must hold a mapping of setting: value")
        unknown = sorted(set(data) - set(self.settings_cls.model_fields))
        if unknown:
            raise SettingsError(f"{CONFIG_ENV}={path}: unknown setting(s) {', '.join(unknown)}")
        return data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False


class _KafkaEnvSource(PydanticBaseSettingsSource):
    """Reads ``STREAMFIT_KAFKA__<NAME>`` variables into the ``kafka`` mapping (merged over the YAML's)."""

    def __call__(self) -> dict[str, Any]:
        found = {k[len(KAFKA_ENV) :]: v for k, v in os.environ.items() if k.startswith(KAFKA_ENV)}
        return {"kafka": found} if found else {}

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False


Port = Annotated[int, Field(ge=0, le=65535)]
"""A TCP port number, checked once for every port setting."""

KafkaClient = Literal["auto", "confluent", "kafka-python"]
"""Client of the hot Kafka write path (:func:`pipeline.kafka.fast_producer`)."""


class Settings(BaseSettings):
    """Every knob of streamfit. Field names are the YAML keys; ``STREAMFIT_<NAME>`` the env vars."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # where local state lives: broker data, broker.json, registry, checkpoints
    home: Path = Path(".streamfit")

    # Kafka
    kafka_bootstrap: str | None = Field(
        None, description="host:port[,host:port]; set means: use this Kafka, start no embedded broker"
    )
    broker_impl: Literal["noida", "tansu"] = "noida"
    broker_host: str = "127.0.0.1"
    broker_port: Port = Field(0, description="0 picks a free port")
    broker_start_timeout_s: float = Field(30.0, gt=0)
    topic_events: str = "events"
    topic_dlq: str = "events.dlq"
    topic_predictions: str = "predictions"
    topic_model_updates: str = "model-updates"
    topic_training_metrics: str = "training-metrics"
    kafka: KafkaProperties = Field(
        default_factory=KafkaProperties,
        description="Kafka client properties by Kafka's names (security.protocol, ssl.cafile, sasl.mechanism, "
        "sasl.plain.username, sasl.plain.password, compression.type, acks, linger.ms, batch.size, ...) for every "
        "client streamfit opens; YAML mapping `kafka:`, or STREAMFIT_KAFKA__<NAME> with _ for each dot",
    )
    events_partitions: int = Field(3, ge=1, description="partitions of events and predictions")
    topic_partitions: int = Field(1, ge=1, description="partitions of events.dlq, model-updates, training-metrics")
    topic_replication_factor: int = Field(
        -1, ge=-1, description="replicas of each topic streamfit creates; -1: the broker's default.replication.factor"
    )
    topic_retention_ms: int = Field(
        240_000,
        ge=-1,
        description="how long events, predictions and training metrics are kept (Kafka's retention.ms; "
        "-1: forever): how far a consumer may fall behind before it loses records. The embedded broker "
        "holds them in memory, about 1 MB per second of data at 1,000 events/s",
    )
    max_event_bytes: int = Field(64 * 1024, ge=256, description="larger events go to the DLQ")
    dlq_max_raw_bytes: int = Field(
        16 * 1024,
        ge=256,
        le=24 * 1024,
        description="a dead letter keeps this many bytes of its event (with the full size and sha256), "
        "so every DLQ record stays under 64 KiB",
    )
    kafka_timeout_s: float = Field(15.0, gt=0, description="bounded wait for an unreachable cluster or a send")
    kafka_client: KafkaClient = Field(
        "auto",
        description="client of the hot write path (streamfit produce, the Spark writer); "
        "auto: confluent-kafka (librdkafka) if installed, else kafka-python",
    )

    # producer
    produce_batch: int = Field(2000, ge=1, description="sends between acknowledgement checks")
    produce_linger_ms: int = Field(5, ge=0)
    produce_metrics_port: Port | None = Field(
        None, description="serve streamfit produce's Prometheus metrics on this port (e.g. 9111); unset: off"
    )

    # models and registry
    model: str = "higgs"
    registry: str | None = Field(None, description="local path or fsspec URL; default <home>/registry")
    registry_keep: int = Field(20, ge=1, description="versions kept per model (aliased ones always kept)")

    # parameter server
    ps_host: str = "127.0.0.1"
    ps_port: Port = 5700
    ps_shards: int = Field(1, ge=1)
    ps_metrics_port: Port | None = Field(
        None, description="serve streamfit ps's Prometheus metrics on this port (shard i: +i; e.g. 9110); unset: off"
    )
    ps_secret: SecretStr | None = Field(
        None,
        description="shared HMAC secret; unset means frames are not "
        "authenticated (an empty value is an error, not 'off')",
    )
    ps_allow_insecure: bool = Field(
        False, description="let `streamfit ps` bind a non-loopback address without ps_secret"
    )
    ps_max_connections: int = Field(64, ge=1, description="concurrent connections per shard; more get a 'busy' error")
    ps_max_frame_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    ps_io_timeout_s: float = Field(60.0, gt=0, description="a frame (or reply) must arrive completely within this")
    ps_wait_s: float = Field(
        30.0,
        ge=0,
        description="streamfit train waits this long at start for a parameter server that is not "
        "reachable yet (one starting or restarting) before it stops with an error",
    )
    ps_idle_timeout_s: float = Field(
        600.0, gt=0, description="connections idle this long are closed; also the longest pull wait"
    )
    ps_checkpoint_every_updates: int = Field(200, ge=1)
    ps_checkpoint_every_s: float = Field(30.0, gt=0)
    ps_publish_every_updates: int = Field(100, ge=1)
    ps_publish_every_s: float = Field(20.0, gt=0)
    ps_encoding: Encoding = Field(
        "float32", description="how training workers send commits (and receive pulls): see pipeline/ps/encoding.py"
    )
    ps_topk_fraction: float = Field(
        0.05, gt=0, le=1, description="with ps_encoding topk, the share of each tensor's entries a commit sends"
    )
    ps_link_mbps: float | None = Field(
        None, gt=0, description="hold the parameter server's link to this many MB/s each way (benchmarks); unset: off"
    )

    # training
    algorithm: str = "adag"
    workers: int = Field(2, ge=1)
    learning_rate: float | None = Field(None, gt=0, description="worker learning rate; default: the model spec's")
    batch_size: int = Field(64, ge=1)
    communication_window: int = Field(5, ge=1)
    rho: float = Field(5.0, gt=0)
    momentum: float | None = Field(
        None, ge=0, lt=1, description="worker (EAMSGD: Nesterov) momentum; default: the spec's"
    )
    epochs: int = Field(1, ge=1)
    seed: int = Field(0, description="seed of shuffles and train/hold-out splits")

    # streaming training (streamfit train)
    prequential_window: int = Field(2000, ge=10, description="labelled events in the sliding prequential accuracy")
    drift_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence on the prequential error stream")
    drift_boost: float = Field(3.0, ge=1, description="learning-rate multiplier after a drift (1 = no reaction)")
    drift_boost_events: int = Field(
        5000,
        ge=0,
        description="labelled events after a drift point that train with the "
        "boosted learning rate (those already trained when it is flagged count)",
    )
    auto_promote: bool = Field(
        False, description="the gate promotes good candidates; off: they wait for `models promote`"
    )
    promotion_margin: float = Field(
        0.01, ge=0, le=1, description="a candidate may trail the champion by this much accuracy"
    )
    gate_window: int = Field(5000, ge=10, description="most recent labelled events the promotion gate scores on")
    gate_min_shadow_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the gate also needs serving's live figures: the candidate agrees with the champion on at "
        "least this share of the rows serving shadowed (serving runs with shadow on); unset: prequential only",
    )
    gate_min_shadow_rows: int = Field(
        1000, ge=1, description="shadowed rows serving must have of a candidate before the gate reviews it"
    )
    gate_serving_url: str = Field(
        "http://127.0.0.1:8000", description="the serving whose /metrics the gate reads the shadow figures from"
    )
    gate_description_length: bool = Field(
        False,
        description="the gate also refuses a candidate whose description length (32 bits per active parameter "
        "plus its summed log loss in bits on the gate window) exceeds the champion's",
    )
    batch_attempts: int = Field(
        3,
        ge=1,
        description="tries of a micro-batch whose commits the parameter server refuses "
        "before its poison events are found, dead-lettered, and the rest trained",
    )
    train_checkpoint: str | None = Field(
        None, description="checkpoint of streamfit train; default <home>/checkpoints/training"
    )
    train_metrics_port: Port | None = Field(
        None, description="serve streamfit train's Prometheus metrics on this port (e.g. 9109); unset: off"
    )

    # Spark
    spark_master: str = "local[2]"
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="Spark properties for every session, over streamfit's own (YAML mapping, or JSON in "
        "STREAMFIT_SPARK_CONF): what a cluster needs, e.g. spark.executor.memory, spark.cores.max, spark.driver.host",
    )
    spark_ui: bool = Field(
        True,
        description="Spark's web UI (a local master's on loopback, port 4040 or the next free one); `streamfit up` "
        "prints its address. false: about 10 MB of driver memory and half a second of start-up less",
    )
    spark_class_archive: bool = Field(
        True,
        description="a local Spark driver maps an archive of Spark's classes, written once per machine by "
        "`streamfit up` under ~/.cache/streamfit (about 150 MB): seconds off every later start",
    )
    kafka_source: Literal["auto", "native", "python"] = "auto"
    max_offsets_per_trigger: int | None = Field(None, ge=1)
    trigger_interval_s: float | None = Field(
        None, ge=0, description="seconds between micro-batches; default 0.5 for the inference query, 2 for training"
    )
    starting_offsets: str = "earliest"
    fail_on_data_loss: bool = Field(
        True,
        description="Spark's failOnDataLoss: a query fails when offsets it should "
        "read are gone (retention, truncation); false: it logs the lost range and goes on",
    )
    spark_min_partitions: int = Field(
        0,
        ge=0,
        description="Spark tasks per micro-batch at least (Kafka ranges are split); 0 = the cores of spark_master",
    )
    predict_checkpoint: str | None = Field(
        None, description="checkpoint of streamfit predict; default <home>/checkpoints/inference"
    )
    predict_metrics_port: Port | None = Field(
        None, description="serve streamfit predict's Prometheus metrics on this port (e.g. 9108); unset: off"
    )

    # web console
    console_host: str = Field("127.0.0.1", description="address the web console binds (streamfit console, up)")
    console_port: Port = Field(8050, description="web console port (up takes a free one when this is taken)")

    # serving
    serve_host: str = "127.0.0.1"
    serve_port: Port = 8000
    admin_token: SecretStr | None = None
    max_batch_size: int = Field(64, ge=1)
    max_batch_wait_ms: float = Field(2.0, ge=0)
    max_request_bytes: int = Field(1024 * 1024, ge=1024)
    max_queued_rows: int = Field(
        4096,
        ge=1,
        description="rows waiting for a forward pass at most; a request beyond "
        "gets 503 with Retry-After instead of growing memory and latency",
    )
    registry_poll_s: float = Field(
        2.0,
        gt=0,
        description="serving re-reads the champion this often: the fallback "
        "when model-updates is unreachable or a message was missed",
    )
    max_loaded_versions: int = Field(
        3,
        ge=2,
        description="model instances kept loaded per model to answer requests: the champion (or pin) and "
        "the most recently used of the versions asked for by /versions/V, /labels/L, canary and shadow",
    )
    canary_share: float = Field(
        0.0, ge=0, le=1, description="share of :predict requests the candidate answers (e.g. 0.05); 0: off"
    )
    shadow: bool = Field(
        False,
        description="the candidate also scores the requests the champion answers, off the request path; "
        "serving exports their agreement and prediction-distribution difference per candidate version",
    )
    shadow_queued_rows: int = Field(
        1024, ge=1, description="rows waiting for the shadow candidate at most; beyond, a request is not shadowed"
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_shape(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    @field_validator("ps_secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("an empty secret would authenticate nothing; unset it to turn HMAC off")
        return value

    @property
    def registry_url(self) -> str:
        return self.registry or str(self.home / "registry")

    @property
    def predict_checkpoint_dir(self) -> str:
        """The inference query's checkpoint: ``predict_checkpoint``, else ``<home>/checkpoints/inference``."""
        return self.predict_checkpoint or str(self.home / "checkpoints" / "inference")

    @property
    def train_checkpoint_dir(self) -> str:
        """The training query's checkpoint: ``train_checkpoint``, else ``<home>/checkpoints/training``."""
        return self.train_checkpoint or str(self.home / "checkpoints" / "training")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return init_settings, env_settings, _KafkaEnvSource(settings_cls), _YamlSource(settings_cls)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, dropping ``None`` overrides (flags the user did not pass).

    Raises :class:`SettingsError` naming the first bad setting.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_ENV}
    unknown = sorted(
        k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known and not k.startswith(KAFKA_ENV)
    )
    if unknown:
        raise SettingsError(f"unknown setting(s) in the environment: {', '.join(unknown)}")
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "?"
            problems.append(f"{name} (env {ENV_PREFIX}{name.upper()}): {err['msg']}")
        raise SettingsError("invalid setting: " + "; ".join(problems)) from None
