"""Settings, read from the environment (prefix ``MINIML_``, nested delimiter ``__``).

Built once in each entrypoint (``create_app(settings)``, the CLI, a flow) and passed down.
``mode=dev`` is the embedded default of ``miniml up``; ``mode=production`` refuses unsafe values.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that must never protect a production deployment.
_WEAK_SECRETS = {"", "changeme", "change-me", "secret", "password", "admin", "miniml", "minioadmin"}


class Mode(StrEnum):
    dev = "dev"
    production = "production"


class StorageKind(StrEnum):
    local = "local"
    s3 = "s3"


class DatabaseSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the metadata DB; default SQLite at <data_dir>/miniml.db. "
        "PostgreSQL: postgresql+psycopg://user:pass@host:5432/miniml.",
    )
    pool_size: int = Field(default=5, ge=1, description="Connection pool size (PostgreSQL only).")
    connect_timeout_s: float = Field(
        default=3.0,
        gt=0,
        description="Seconds to wait for a DB connection, a pooled one, or a lock another writer holds "
        "(SQLite's busy timeout, PostgreSQL's lock_timeout) before answering 503.",
    )


# A miniml API key (``miniml new-key`` makes one); checked where a key is given in the settings.
KEY_PATTERN = r"^mml_[0-9a-f]{12}_[A-Za-z0-9_-]{32,}$"


class AuthSettings(BaseModel):
    jwt_secret: str | None = Field(
        default=None,
        description="HS256 secret for access tokens. Unset: generated on first start and kept in the "
        "metadata DB, so every api replica shares it. Set: at least 32 characters in production.",
    )
    jwt_ttl_s: int = Field(default=3600, ge=60, le=86400, description="Lifetime of an access token (s).")
    bootstrap_admin_key: bool = Field(
        default=True,
        description="On first start with no keys, create an admin key, print it once and write it "
        "to <data_dir>/admin.key (mode 0600).",
    )
    model_signing_key: str | None = Field(
        default=None,
        description="HMAC key that signs every model version the platform registers; the inference service "
        "and the flows load only versions it signed. Only workers and inference need it. Unset: "
        "<data_dir>/signing.key, created (0600) on first use. Set: at least 32 characters in production.",
    )
    admin_key: str | None = Field(
        default=None,
        pattern=KEY_PATTERN,
        description="The first admin key, given instead of made (make one with `miniml new-key`): stored on the "
        "first start with no keys, and written nowhere. For Kubernetes, from a Secret.",
    )
    bootstrap_service_keys: bool = Field(
        default=True,
        description="On start, create a key of the worker role and one of the inference role when "
        "<data_dir>/worker.key or <data_dir>/inference.key is missing, and write them there (mode 0600). "
        "Off: give each service its key with MINIML_WORKER__API_KEY and MINIML_INFERENCE__API_KEY.",
    )


def _drain_field() -> Any:
    """The api's and inference's graceful drain (``miniml/drain.py``)."""
    return Field(
        default=2.0,
        ge=0,
        le=120,
        description="On SIGTERM: seconds of answering /readyz 503 while still serving, before it stops listening "
        "and finishes the requests in flight.",
    )


class ApiSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Interface the api binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the api.")
    public_url: str | None = Field(
        default=None, description="URL clients use to reach the api; default http://host:port."
    )
    max_json_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest JSON body accepted by any route (413 above)."
    )
    max_upload_bytes: int = Field(default=1 << 30, ge=1024, description="Largest dataset upload accepted (413 above).")
    drain_s: float = _drain_field()


class StorageSettings(BaseModel):
    kind: StorageKind = Field(default=StorageKind.local, description="Object store: local or s3.")
    root: Path | None = Field(default=None, description="Local store folder; default <data_dir>/objects.")
    bucket: str = Field(default="miniml", description="S3 bucket for datasets and outputs.")
    prefix: str = Field(default="", description="Key prefix inside the bucket (no leading slash).")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO); unset for AWS.")
    region: str = Field(default="us-east-1", description="S3 region.")
    access_key_id: str | None = Field(default=None, description="S3 access key id; unset: boto3's chain.")
    secret_access_key: str | None = Field(default=None, description="S3 secret; unset: boto3's chain.")


class MlflowSettings(BaseModel):
    port: int = Field(default=5001, ge=1, le=65535, description="Port of the MLflow server (miniml up).")
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking server URL; default http://127.0.0.1:<port>."
    )
    public_url: str | None = Field(default=None, description="MLflow UI URL shown to users.")
    auth: bool = Field(
        default=True,
        description="MLflow behind credentials: miniml up starts it with MLflow's basic-auth app, each "
        "person's API key signs in to it (username: the key id, password: the key) and sees only its "
        "projects' runs and models. The platform's processes use the MLflow admin account.",
    )
    admin_password: str | None = Field(
        default=None,
        description="Password of MLflow's admin account ('miniml'). Unset: <data_dir>/mlflow.password, made "
        "(0600) on first start. Give the same value to every role in compose.",
    )


class PrefectSettings(BaseModel):
    port: int = Field(default=4200, ge=1, le=65535, description="Port of the Prefect server (miniml up).")
    api_url: str | None = Field(default=None, description="Prefect API URL; default http://127.0.0.1:<port>/api.")


class WorkerSettings(BaseModel):
    api_key: str | None = Field(
        default=None,
        pattern=KEY_PATTERN,
        description="Key of the worker role (POST /api/v1/keys with role worker) the worker reports to the api "
        "with. Unset: <data_dir>/worker.key, written by the api (miniml up and compose share that folder).",
    )
    concurrency: int = Field(default=2, ge=1, description="Jobs one worker process runs at once.")
    poll_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds between the worker's asks to Prefect for submitted flow runs: a job waits at most "
        "this long before its flow run starts.",
    )
    trial_threads: int = Field(
        default=0, ge=0, description="Parallel trials inside one job; 0 = the number of CPU cores."
    )
    heartbeat_s: float = Field(default=5.0, gt=0, description="Seconds between a running job's heartbeats.")
    outlast_api_s: float = Field(
        default=300.0,
        ge=0,
        description="How long a worker sends a call again while the api does not take connections (restarting "
        "or down) before its job fails; the api, back, gives running jobs jobs.heartbeat_timeout_s to report in.",
    )
    shard_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="A shard of a parallel job claims at most its share of the trial budget for this long "
        "after it starts, so that shards still starting get theirs; then it takes whatever is left.",
    )
    metrics_port: int = Field(
        default=9101, ge=0, le=65535, description="Port of the worker's Prometheus /metrics; 0 turns it off."
    )
    metrics_host: str = Field(default="127.0.0.1", description="Interface the worker's /metrics binds.")


class JobSettings(BaseModel):
    heartbeat_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job with no heartbeat for this long is ended: failed, or cancelled when a cancel "
        "was asked for. Counted from the api's start too: after a restart, live workers report in first.",
    )
    loop_interval_s: float = Field(
        default=5.0, gt=0, description="How often the api retries submissions and checks heartbeats."
    )
    mlflow_sync_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the api brings MLflow's grants in step with keys, projects and models "
        "(a revocation reaches MLflow at once).",
    )
    gpu_image: str | None = Field(
        default=None,
        description="On a Kubernetes work pool: the image the flow runs of jobs asking for a GPU run (the same "
        "platform built with a CUDA build of PyTorch, deploy/Dockerfile's TORCH_INDEX_URL). Unset: the pool's image.",
    )


class MonitoringSettings(BaseModel):
    metrics_token: str | None = Field(
        default=None,
        description="When set, /metrics of the api and the inference service answer only "
        "'Authorization: Bearer <token>' (give Prometheus the same token). Unset: /metrics is open, "
        "so bind the services to a private interface.",
    )
    drift_min_rows: int = Field(
        default=30, ge=1, description="A drift check with fewer captured rows in its window reports no_data."
    )
    quality_window_s: int = Field(default=3600, ge=60, description="Window of feedback behind the live quality gauges.")
    prediction_memory_rows: int = Field(
        default=20_000,
        ge=0,
        description="Recent predictions an inference replica keeps so feedback can be joined with them; "
        "feedback for an older prediction answers 404.",
    )
    prometheus_port: int = Field(
        default=9090, ge=1, le=65535, description="Port of Prometheus, which miniml up starts when it is installed."
    )
    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus the api asks for a deployment's live traffic (the console's charts); default "
        "http://127.0.0.1:<prometheus_port>.",
    )


class InferenceSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Interface the inference service binds.")
    port: int = Field(default=8080, ge=1, le=65535, description="Port of the inference service.")
    api_key: str | None = Field(
        default=None,
        pattern=KEY_PATTERN,
        description="Key of the inference role the service reads desired deployments with. Unset: "
        "<data_dir>/inference.key, written by the api (miniml up and compose share that folder).",
    )
    replica_id: str | None = Field(default=None, description="This replica's name; default host:port.")
    public_url: str | None = Field(
        default=None, description="URL the api uses to push reconciles to this replica; default http://host:port."
    )
    reconcile_s: float = Field(default=10.0, gt=0, description="Seconds between reconciles with the api.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Server processes of one replica (uvicorn workers), e.g. one per core. Each reconciles on its own; "
        "a push reaches one of them, the others follow within reconcile_s.",
    )
    max_rows: int = Field(default=10_000, ge=1, description="Most rows one predict request may carry (422 above).")
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body the inference service reads (413 above)."
    )
    max_batch_rows: int = Field(
        default=4096, ge=1, description="Most rows the micro-batcher merges into one model call."
    )
    key_cache_s: float = Field(
        default=1.0,
        ge=0,
        le=2.0,
        description="How long a caller's checked key or token is trusted before asking the api again; "
        "a revoked key stops working on every replica within this time.",
    )
    capture_fraction: float = Field(
        default=1.0, ge=0, le=1, description="Share of predict requests whose inputs and outputs are kept for drift."
    )
    capture_buffer_rows: int = Field(
        default=20_000, ge=0, description="Captured rows held in memory between flushes; beyond, samples are dropped."
    )
    capture_flush_s: float = Field(default=30.0, gt=0, description="Seconds between writes of captured rows.")
    key_stale_s: float = Field(
        default=300.0,
        ge=0,
        le=3600,
        description="While the api cannot be reached (restarting), a key it accepted within this many seconds keeps "
        "predicting; keys never seen, or refused, are not served. 0: every check needs the api.",
    )
    drain_s: float = _drain_field()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MINIML_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    mode: Mode = Field(
        default=Mode.dev,
        description="dev: the embedded default, generated secrets allowed. production: refuses "
        "weak secrets and expects PostgreSQL/S3 by configuration.",
    )
    data_dir: Path = Field(default=Path(".miniml"), description="Folder for every local file.")
    log_level: str = Field(default="INFO", description="Log level of every process.")
    db: DatabaseSettings = Field(default_factory=DatabaseSettings, description="Metadata DB.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Keys and tokens.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="Control-plane api.")
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Object store.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="MLflow server.")
    prefect: PrefectSettings = Field(default_factory=PrefectSettings, description="Prefect server.")
    inference: InferenceSettings = Field(default_factory=InferenceSettings, description="Data plane.")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="Training workers.")
    jobs: JobSettings = Field(default_factory=JobSettings, description="Job supervision.")
    monitoring: MonitoringSettings = Field(
        default_factory=MonitoringSettings, description="Drift, feedback and Prometheus."
    )

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.mode is not Mode.production:
            return self
        problems = []
        secret = self.auth.jwt_secret
        if secret is not None and (secret.strip().lower() in _WEAK_SECRETS or len(secret) < 32):
            problems.append("MINIML_AUTH__JWT_SECRET is a default or shorter than 32 characters")
        signing = self.auth.model_signing_key
        if signing is not None and (signing.strip().lower() in _WEAK_SECRETS or len(signing) < 32):
            problems.append("MINIML_AUTH__MODEL_SIGNING_KEY is a default or shorter than 32 characters")
        s3_secret = self.storage.secret_access_key
        if (
            self.storage.kind is StorageKind.s3
            and s3_secret is not None
            and (s3_secret.strip().lower() in _WEAK_SECRETS)
        ):
            problems.append("MINIML_STORAGE__SECRET_ACCESS_KEY is a default value")
        if problems:
            raise ValueError(
                "Refusing to start in production mode: " + "; ".join(problems) + ". Set strong values "
                "(or leave the JWT secret unset to have one generated), or use MINIML_MODE=dev locally."
            )
        return self

    @property
    def db_url(self) -> str:
        return self.db.url or f"sqlite:///{(self.data_dir / 'miniml.db').resolve()}"

    @property
    def storage_root(self) -> Path:
        return self.storage.root or self.data_dir / "objects"

    @property
    def api_url(self) -> str:
        return self.api.public_url or f"http://{_client_host(self.api.host)}:{self.api.port}"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow.tracking_uri or f"http://127.0.0.1:{self.mlflow.port}"

    @property
    def mlflow_public_url(self) -> str:
        return self.mlflow.public_url or self.mlflow_uri

    @property
    def prefect_api_url(self) -> str:
        return self.prefect.api_url or f"http://127.0.0.1:{self.prefect.port}/api"

    @property
    def inference_url(self) -> str:
        return f"http://{_client_host(self.inference.host)}:{self.inference.port}"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
