"""Settings, all read from the environment (django-environ).

Every default is the *embedded* mode: SQLite, files on local disk and an in-process dramatiq broker under
``ESD_VAR_DIR``, so a fresh machine needs nothing installed. ``DATABASE_URL``, ``DRAMATIQ_BROKER_URL`` and the
storage variables switch to the scaled-out services. ``.env.example`` lists every variable read here.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import environ

from esd.api.schemas import ERROR_COMPONENT

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

ESD_VAR_DIR = Path(env.str("ESD_VAR_DIR", default=str(BASE_DIR / "var"))).resolve()
ESD_VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """Use SECRET_KEY when given; otherwise generate one once and keep it under the var dir.

    A key that changes on every start would log everybody out and invalidate every signed upload URL.
    """
    given = env.str("SECRET_KEY", default="")
    if given:
        return given
    path = ESD_VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS in production (behind a TLS-terminating proxy); the README's example passes `check --deploy` ---------
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# "true": trust the proxy's X-Forwarded-Proto (only behind a proxy that sets it and strips clients' copies)
_TRUST_PROXY_PROTO = env.bool("SECURE_PROXY_SSL_HEADER", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if _TRUST_PROXY_PROTO else None
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "guardian",
    "django_dramatiq",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "esd",
    "apps.accounts",
    "apps.models_registry",
    "apps.endpoints",
    "apps.inference",
    "apps.training",
]

MIDDLEWARE = [
    "esd.monitoring.ProbeMiddleware",  # /metrics /healthz /readyz, before host checks and redirects (esd.monitoring)
    "esd.api.middleware.ApiMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
]

# The accounts app's rules, which the plumbing (esd.api, esd.console) applies without importing any app.
ESD_PERMISSIONS_OF = "apps.accounts.models.permissions_of"
ROOT_URLCONF = "esd.urls"
# Every API resource, registered on the one router under ESD_API_PREFIX (esd.api.routers).
ESD_API_RESOURCES = {
    "ping": "apps.accounts.api.views.PingViewSet",
    "roles": "apps.accounts.api.views.RoleViewSet",
    "users": "apps.accounts.api.views.UserViewSet",
    "checkpoints": "apps.models_registry.api.views.CheckpointViewSet",
    "datasets": "apps.training.api.views.DatasetViewSet",
    "trainings": "apps.training.api.trainings.TrainingViewSet",
    "endpoints": "apps.endpoints.api.views.EndpointViewSet",
    "inferences": "apps.inference.api.views.InferenceViewSet",
}
WSGI_APPLICATION = "esd.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "esd.console.navigation",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{ESD_VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers work while the actor threads write; IMMEDIATE transactions avoid the
    # "database is locked" upgrade deadlock between concurrent writers.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
# Persistent connections: opening one (and, on SQLite, setting its pragmas) per request costs more than the request.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("CONN_HEALTH_CHECKS", default=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache ----------------------------------------------------------------------------------------------------
# In-process by default. With several web processes, a shared cache (redis://...) makes key revocation reach
# every process at once instead of within ESD_KEY_CACHE_SECONDS.
CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://esd")}
# How long a verified API key is remembered (0 turns the cache off). Changes made through the app drop it at once
# in this process (and in all of them with a shared cache); every other process sees a revocation, a deleted
# or deactivated user within this time. More than 1 fails ``manage.py check`` (revocation must take 1 s at most).
ESD_KEY_CACHE_SECONDS = env.int("ESD_KEY_CACHE_SECONDS", default=1)

# --- Auth -------------------------------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: a locked-out user and address never reach the password check
    "django.contrib.auth.backends.ModelBackend",
    # django-guardian's backend, answering for shared resources with the API's own visibility querysets
    "apps.accounts.backends.SharedResourceBackend",
]
# guardian.W001 asks for its own backend class; ours is a subclass of it.
SILENCED_SYSTEM_CHECKS = ["guardian.W001"]
# No guardian "AnonymousUser" row: it would show up in GET /users.
ANONYMOUS_USER_NAME = None
GUARDIAN_MONKEY_PATCH_USER = False
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Console and admin sign-in is throttled per user name *and* address (django-axes, in the database so every
# process agrees): after AXES_FAILURE_LIMIT failures that pair waits AXES_COOLOFF_MINUTES.
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# The client address: the socket's, unless AXES_PROXY_COUNT trusted proxies set X-Forwarded-For (a client's own
# header must not pick the address its failures count against).
_AXES_PROXIES = env.int("AXES_PROXY_COUNT", default=0)
AXES_IPWARE_META_PRECEDENCE_ORDER = ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR") if _AXES_PROXIES else ("REMOTE_ADDR",)
AXES_IPWARE_PROXY_COUNT = _AXES_PROXIES or None
AXES_LOCKOUT_TEMPLATE = "console/accounts/locked_out.html"
LOGIN_URL = "console:login"
LOGIN_REDIRECT_URL = "console:dashboard"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")  # also the day of GPU-seconds accounting and daily quotas
USE_I18N = True
USE_TZ = True

# --- Static files (whitenoise serves them; no CDN anywhere) -------------------------------------------------
STATIC_URL = "static/"
# Images collect them at build time into a directory of their own (a volume on ESD_VAR_DIR would hide them).
STATIC_ROOT = Path(env.str("STATIC_ROOT", default="") or ESD_VAR_DIR / "static")
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [d for d in [BASE_DIR / "static"] if d.is_dir()]
# Serve straight from the app and package static dirs: `make run` needs no collectstatic step.
WHITENOISE_USE_FINDERS = True

# --- Blob storage (contract §1, §8) ---------------------------------------------------------------------------
# `local`: objects under $ESD_VAR_DIR/storage/$ESD_BUCKET, presigned URLs served by this server under /blob/.
# `s3`: the bucket $ESD_BUCKET on AWS, or on MinIO/moto at AWS_ENDPOINT_URL.
ESD_STORAGE = env.str("ESD_STORAGE", default="local")
if ESD_STORAGE not in ("local", "s3"):
    raise environ.ImproperlyConfigured(f"ESD_STORAGE must be local or s3, got {ESD_STORAGE!r}")
ESD_BUCKET = env.str("ESD_BUCKET", default="esd")
AWS_ENDPOINT_URL = env.str("AWS_ENDPOINT_URL", default="")
AWS_REGION = env.str("AWS_REGION", default="us-east-1")
# The S3 host clients reach, when it differs from the one this server uses (SigV4 signs the host).
S3_PUBLIC_ENDPOINT_URL = env.str("S3_PUBLIC_ENDPOINT_URL", default="")
# Base of the local store's signed URLs: how clients reach this server. `runesd` fills it from --host/--port.
ESD_PUBLIC_URL = env.str("ESD_PUBLIC_URL", default="http://127.0.0.1:8000").rstrip("/")
# The local store refuses multipart parts below this size except the last, as S3 does (5 MiB).
ESD_MULTIPART_MIN_PART_BYTES = env.int("ESD_MULTIPART_MIN_PART_BYTES", default=5 * 1024 * 1024)
ESD_PRESIGN_EXPIRES = env.int("ESD_PRESIGN_EXPIRES", default=3600)
ESD_UPLOAD_PART_EXPIRES = env.int("ESD_UPLOAD_PART_EXPIRES", default=86400)
ESD_DATASET_UPLOAD_EXPIRES = env.int("ESD_DATASET_UPLOAD_EXPIRES", default=7 * 86400)
ESD_DATASET_PREVIEW_EXPIRES = env.int("ESD_DATASET_PREVIEW_EXPIRES", default=86400)

# Checkpoints by URL (contract §9.4): private, loopback and link-local addresses are refused unless allowed;
# ESD_CHECKPOINT_URL_ALLOWED_NETWORKS admits named internal networks (a model mirror) while the guard stays on.
ESD_CHECKPOINT_URL_ALLOW_PRIVATE = env.bool("ESD_CHECKPOINT_URL_ALLOW_PRIVATE", default=False)
ESD_CHECKPOINT_URL_ALLOWED_NETWORKS = env.list("ESD_CHECKPOINT_URL_ALLOWED_NETWORKS", default=[])
ESD_CHECKPOINT_URL_MAX_BYTES = env.int("ESD_CHECKPOINT_URL_MAX_BYTES", default=20 * 1024**3)

# --- Webhooks (apps.accounts.webhooks) --------------------------------------------------------------------------
# Webhook URLs pass the same SSRF guard as checkpoint downloads, with their own allowances: any console user can
# add a webhook, so a network opened to downloads (a model mirror) is not opened to webhooks unless named here too.
ESD_WEBHOOK_ALLOW_PRIVATE = env.bool("ESD_WEBHOOK_ALLOW_PRIVATE", default=False)
ESD_WEBHOOK_ALLOWED_NETWORKS = env.list("ESD_WEBHOOK_ALLOWED_NETWORKS", default=[])
# Seconds one attempt may take in all: connecting, sending and reading the answer's status line and headers.
ESD_WEBHOOK_TIMEOUT = env.float("ESD_WEBHOOK_TIMEOUT", default=10.0)
# Attempts per delivery (the first and its retries); retries back off exponentially from MIN to MAX (ms).
ESD_WEBHOOK_MAX_ATTEMPTS = env.int("ESD_WEBHOOK_MAX_ATTEMPTS", default=9)
ESD_WEBHOOK_MIN_BACKOFF_MS = env.int("ESD_WEBHOOK_MIN_BACKOFF_MS", default=10_000)
ESD_WEBHOOK_MAX_BACKOFF_MS = env.int("ESD_WEBHOOK_MAX_BACKOFF_MS", default=3_600_000)
# The queue deliveries wait in (control-plane workers consume it): a slow receiver never delays runtime events.
ESD_WEBHOOK_QUEUE = env.str("ESD_WEBHOOK_QUEUE", default="esd-webhooks")
# Seconds between two test pings of one webhook (console Test button, `manage.py webhooks test`, admin action).
ESD_WEBHOOK_PING_INTERVAL = env.int("ESD_WEBHOOK_PING_INTERVAL", default=10)

# --- Endpoints, inference and training (contract §14) --------------------------------------------------------
ESD_ONE_ENDPOINT_PER_ROLE = env.bool("ESD_ONE_ENDPOINT_PER_ROLE", default=True)
# Instances allowed per instance type across live endpoints: "ml.g4dn.16xlarge=0,*=16".
ESD_INSTANCE_QUOTAS = env.str("ESD_INSTANCE_QUOTAS", default="*=16")
ESD_DEFAULT_ENDPOINT_BACKEND = env.str("ESD_DEFAULT_ENDPOINT_BACKEND", default="self-hosted")
ESD_TRAINING_BACKEND = env.str("ESD_TRAINING_BACKEND", default=ESD_DEFAULT_ENDPOINT_BACKEND)
ESD_REALTIME_TIMEOUT = env.int("ESD_REALTIME_TIMEOUT", default=60)
ESD_ASYNC_TIMEOUT = env.int("ESD_ASYNC_TIMEOUT", default=3600)
ESD_SELF_HOSTED_STARTUP_TIMEOUT = env.int("ESD_SELF_HOSTED_STARTUP_TIMEOUT", default=3600)
ESD_WORKER_HEARTBEAT_TTL = env.int("ESD_WORKER_HEARTBEAT_TTL", default=45)
ESD_TRAINING_QUEUE = env.str("ESD_TRAINING_QUEUE", default="esd-training")
# Upload slots for a training's sample images (kohya's sample_prompts); images past them are noted, not uploaded.
ESD_TRAINING_SAMPLE_SLOTS = env.int("ESD_TRAINING_SAMPLE_SLOTS", default=200)
# The most intermediate saves of each kind (epoch files, step files) a training may make: the server presigns an
# upload URL for each, and the trainer refuses a run that would make more before its first step, naming the file.
ESD_TRAINING_MAX_SAVES = env.int("ESD_TRAINING_MAX_SAVES", default=200)
# A running self-hosted training whose worker has not heartbeated for this long is failed (resumable from a state).
ESD_TRAINING_WORKER_LOST_SECONDS = env.int("ESD_TRAINING_WORKER_LOST_SECONDS", default=300)
ESD_EVENTS_QUEUE = env.str("ESD_EVENTS_QUEUE", default="esd-events")
# Unfinished multipart uploads older than this are aborted by the hourly sweep (``manage.py sweep_uploads``).
ESD_MULTIPART_MAX_AGE_HOURS = env.float("ESD_MULTIPART_MAX_AGE_HOURS", default=24.0)
# How often the periodic sweep re-checks every endpoint (seconds).
ESD_ENDPOINT_SWEEP_SECONDS = env.int("ESD_ENDPOINT_SWEEP_SECONDS", default=180)
# SageMaker is configured when the role and both images are set.
ESD_SAGEMAKER_ROLE_ARN = env.str("ESD_SAGEMAKER_ROLE_ARN", default="")
ESD_SAGEMAKER_INFERENCE_IMAGE = env.str("ESD_SAGEMAKER_INFERENCE_IMAGE", default="")
ESD_SAGEMAKER_TRAINING_IMAGE = env.str("ESD_SAGEMAKER_TRAINING_IMAGE", default="")
ESD_SAGEMAKER_SUCCESS_TOPIC = env.str("ESD_SAGEMAKER_SUCCESS_TOPIC", default="")
ESD_SAGEMAKER_ERROR_TOPIC = env.str("ESD_SAGEMAKER_ERROR_TOPIC", default="")
ESD_SAGEMAKER_NOTIFICATION_QUEUE = env.str("ESD_SAGEMAKER_NOTIFICATION_QUEUE", default="")

# django-storages' S3Storage does every S3 object operation (esd.storage.S3BlobStore adds the bucket, endpoint and
# region it is asked for): path-style addressing, SigV4, keys written as given.
ESD_S3_OPTIONS = {"addressing_style": "path", "signature_version": "s3v4", "file_overwrite": True}
# Django's own file storage (used by Django-level file fields) lives in the same place as the blob store.
if ESD_STORAGE == "s3":
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            **ESD_S3_OPTIONS,
            "bucket_name": ESD_BUCKET,
            "endpoint_url": AWS_ENDPOINT_URL or None,
            "region_name": AWS_REGION,
            "location": "django",
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(ESD_VAR_DIR / "storage" / ESD_BUCKET / "django")},
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# --- ESD API ------------------------------------------------------------------------------------------------
ESD_API_PREFIX = env.str("ESD_API_PREFIX", default="api/").strip("/") + "/"
ESD_API_DOCS_PUBLIC = env.bool("ESD_API_DOCS_PUBLIC", default=True)
ESD_MAX_BODY_BYTES = env.int("ESD_MAX_BODY_BYTES", default=10 * 1024 * 1024)
ESD_PAGE_MAX = env.int("ESD_PAGE_MAX", default=1000)
ESD_WEBUI_PASSWORD_SYNC = env.bool("ESD_WEBUI_PASSWORD_SYNC", default=False)
ESD_PASSWORD_ENCRYPTION_KEY = env.str("ESD_PASSWORD_ENCRYPTION_KEY", default="")
ESD_PASSWORD_VALIDATION = env.bool("ESD_PASSWORD_VALIDATION", default=False)
# How stale an API key's last_used_at may get before a request writes it again (one write per key per window).
ESD_KEY_LAST_USED_RESOLUTION = env.int("ESD_KEY_LAST_USED_RESOLUTION", default=60)
DATA_UPLOAD_MAX_MEMORY_SIZE = ESD_MAX_BODY_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.accounts.authentication.ApiKeyAuthentication",
        "apps.accounts.authentication.EsdSessionAuthentication",
    ],
    # Steps 4 and 5 of the contract's check order (§3.3), run by EsdViewSet after validation, in this order.
    "DEFAULT_PERMISSION_CLASSES": [
        "apps.accounts.access.ActingUser",
        "apps.accounts.access.HoldsRequiredPermission",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["esd.api.negotiation.DeferredBodyParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "esd.api.negotiation.JsonOnlyNegotiation",
    "EXCEPTION_HANDLER": "esd.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "esd.api.openapi.EsdAutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "ESD Server API",
    "DESCRIPTION": (
        "The REST API of Extension for Stable Diffusion on AWS (ESD) 1.5.0, served by ESD Server. "
        "Authenticate with the `x-api-key` header; service keys name the acting user with the `username` header."
    ),
    "VERSION": "1.5.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/" + ESD_API_PREFIX.rstrip("/"),
    "COMPONENT_SPLIT_REQUEST": False,
    # Several resources have a "status" (and "type"): each enum gets its resource's name in the document.
    "ENUM_NAME_OVERRIDES": {
        "CheckpointStatusEnum": "apps.models_registry.choices.CheckpointStatus",
        "CheckpointTypeEnum": "apps.models_registry.choices.CheckpointType",
        "InferenceStatusEnum": "apps.inference.choices.InferenceStatus",
        "EndpointStatusEnum": "apps.endpoints.choices.EndpointStatus",
        "EndpointTypeEnum": "apps.endpoints.choices.EndpointType",
    },
    "APPEND_COMPONENTS": {"schemas": {"Error": ERROR_COMPONENT}},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "esd.api.openapi.bodies_are_required",
    ],
}

# --- Background work (dramatiq) ---------------------------------------------------------------------------
DRAMATIQ_BROKER_URL = env.str("DRAMATIQ_BROKER_URL", default="")
_DRAMATIQ_MIDDLEWARE = [
    "dramatiq.middleware.AgeLimit",
    "dramatiq.middleware.TimeLimit",
    "dramatiq.middleware.ShutdownNotifications",
    "dramatiq.middleware.Callbacks",
    "dramatiq.middleware.Pipelines",
    "dramatiq.middleware.Retries",
    "dramatiq.middleware.CurrentMessage",
    "django_dramatiq.middleware.DbConnectionsMiddleware",
]


def dramatiq_broker_settings(url: str) -> dict:
    """Pick the dramatiq broker from a URL: redis:// or amqp://, or the in-process broker when empty."""
    if not url:
        return {"BROKER": "dramatiq.brokers.stub.StubBroker", "OPTIONS": {}, "MIDDLEWARE": _DRAMATIQ_MIDDLEWARE}
    if url.startswith(("redis://", "rediss://", "unix://")):
        return {
            "BROKER": "dramatiq.brokers.redis.RedisBroker",
            "OPTIONS": {"url": url},
            "MIDDLEWARE": _DRAMATIQ_MIDDLEWARE,
        }
    if url.startswith(("amqp://", "amqps://")):
        return {
            "BROKER": "dramatiq.brokers.rabbitmq.RabbitmqBroker",
            "OPTIONS": {"url": url},
            "MIDDLEWARE": _DRAMATIQ_MIDDLEWARE,
        }
    raise environ.ImproperlyConfigured(f"DRAMATIQ_BROKER_URL must be redis://, rediss:// or amqp://, got {url!r}")


DRAMATIQ_BROKER = dramatiq_broker_settings(DRAMATIQ_BROKER_URL)
# Actors run inside `runesd` (embedded) with this many threads; `rundramatiq` takes --threads.
ESD_EMBEDDED_WORKER_THREADS = env.int("ESD_EMBEDDED_WORKER_THREADS", default=4)
# `runesd` also runs a gpu_runtime worker for every self-hosted endpoint when the runtime extra is installed.
ESD_EMBEDDED_GPU_WORKER = env.bool("ESD_EMBEDDED_GPU_WORKER", default=True)
ESD_EMBEDDED_GPU_DEVICE = env.str("ESD_EMBEDDED_GPU_DEVICE", default="auto")

# --- Monitoring (esd.monitoring: /metrics, /healthz, /readyz) -----------------------------------------------
# Set: /metrics wants "Authorization: Bearer <token>". Unset: served to loopback and private addresses only.
# Production should set it: an address says nothing behind a proxy that adds no forwarding header (an L4 balancer
# with SNAT). Without it, a non-DEBUG process logs a warning at startup.
ESD_METRICS_TOKEN = env.str("ESD_METRICS_TOKEN", default="")
# Seconds each /readyz check (database, migrations, broker, storage) may take before it counts as failing.
ESD_READY_TIMEOUT = env.float("ESD_READY_TIMEOUT", default=3.0)
# Seconds one /readyz answer serves every caller (one round of checks at a time, whoever asks).
ESD_READY_CACHE_SECONDS = env.float("ESD_READY_CACHE_SECONDS", default=5.0)
# Seconds /readyz trusts a passed migrations check (loading every migration is dear; a new deploy may add some).
ESD_READY_MIGRATIONS_SECONDS = env.float("ESD_READY_MIGRATIONS_SECONDS", default=60.0)
# Add a user label to esd_inference_gpu_seconds_total (one series per user and endpoint; it exposes user names).
ESD_METRICS_USER_LABELS = env.bool("ESD_METRICS_USER_LABELS", default=False)
# --- Deploying GPU workers on Kubernetes with KEDA (`manage.py k8s_manifests`, README "Deploy") -------------------
ESD_GPU_WORKER_IMAGE = env.str("ESD_GPU_WORKER_IMAGE", default="esd-gpu-runtime:latest")
ESD_K8S_NAMESPACE = env.str("ESD_K8S_NAMESPACE", default="esd")

# --- Logging ------------------------------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
