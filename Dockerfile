# The control plane: one image for the web process (gunicorn), the control worker (`manage.py rundramatiq`) and
# every `manage.py` command (migrate, setup_storage, recover_work, k8s_manifests, ...). It holds no GPU runtime:
# GPU workers run the image of gpu_runtime/Dockerfile.
#   docker build -t esd-server .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ESD_VAR_DIR=/var/lib/esd \
    STATIC_ROOT=/app/staticfiles \
    ESD_EMBEDDED_GPU_WORKER=false

RUN groupadd --system --gid 10001 esd \
 && useradd --system --uid 10001 --gid esd --home-dir /app --no-create-home --shell /usr/sbin/nologin esd

# Exactly [project].dependencies of pyproject.toml, in a layer that changes only with it.
COPY pyproject.toml deploy/pyproject_requirements.py /build/
RUN python /build/pyproject_requirements.py > /build/requirements.txt \
 && pip install --no-cache-dir -r /build/requirements.txt

WORKDIR /app
COPY manage.py pyproject.toml ./
COPY esd ./esd
COPY apps ./apps
COPY templates ./templates
COPY static ./static
# The control plane imports gpu_runtime.protocol only (the layering contracts); torch is not installed.
COPY gpu_runtime/__init__.py ./gpu_runtime/
COPY gpu_runtime/protocol ./gpu_runtime/protocol

# Static files collected at build time (whitenoise serves them); nothing written here survives the build but them.
RUN SECRET_KEY=collectstatic-only ESD_VAR_DIR=/tmp/esd-build python manage.py collectstatic --noinput -v0 \
 && rm -rf /tmp/esd-build \
 && mkdir -p /var/lib/esd \
 && chown esd:esd /var/lib/esd

USER 10001:10001
EXPOSE 8000
CMD ["gunicorn", "esd.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", "--worker-class", "gthread", "--threads", "4"]
