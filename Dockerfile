# clipgallery web app: Python 3.11, CPU-only torch, Node.js 22 for Reflex's frontend build.
# Used by docker-compose.yml; see docs/deployment.md. Build: docker build -t clipgallery .

# --- Stage 1: Node.js 22 and npm, both from the npm registry --------------------------------
# Reflex needs Node.js >= 22.22; Debian bookworm has 18. `make node` installs the official
# binary (the registry's node-<os>-<arch> package) into .tools/node22, where `clipgallery serve`
# looks for it. Debian's npm is used only here, to fetch it; the final image has no Debian node.
FROM python:3.11-slim-bookworm AS node
RUN apt-get update \
    && apt-get install -y --no-install-recommends make npm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile ./
# npm 11.19.1 on Node 22 is the pair the project's own test runs use (Reflex runs `npm install`
# and `npm run export` with REFLEX_USE_NPM=1).
RUN make node \
    && npm install --no-fund --no-audit --prefix .tools/npm npm@11.19.1

# --- Stage 2: the app -------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/app/.tools/node22/node_modules/.bin:/app/.tools/npm/node_modules/.bin:/opt/venv/bin:$PATH \
    REFLEX_USE_NPM=1 \
    REFLEX_TELEMETRY_ENABLED=false \
    REFLEX_CHECK_LATEST_VERSION=0 \
    CLIPGALLERY_UPLOAD_DIR=/data/uploaded_files \
    HF_HOME=/home/clipgallery/.cache/huggingface

# A non-root user owns the app directory (Reflex rewrites .web/ at every start) and the data
# folders. Named volumes mounted on /data/uploaded_files and /home/clipgallery/.cache start as
# copies of these folders, with this owner.
RUN useradd --create-home --home-dir /home/clipgallery --uid 10001 --user-group clipgallery \
    && mkdir -p /app /data/uploaded_files /home/clipgallery/.cache/huggingface \
    && chown -R clipgallery:clipgallery /app /data /home/clipgallery

# Dependencies first, so code changes do not reinstall them. torch and torchvision come as CPU
# wheels from PyTorch's own index (the versions pinned in requirements.txt, with the +cpu local
# tag, so the next install sees them satisfied); everything else from PyPI. PyPI's own torch
# build also runs on CPUs, only larger: --build-arg TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN grep -oE '^(torch|torchvision)==[^ #]+' /tmp/requirements.txt \
        | xargs pip install --index-url "$TORCH_INDEX_URL" \
    && pip install -r /tmp/requirements.txt

COPY --from=node --chown=clipgallery:clipgallery /app/.tools /app/.tools
WORKDIR /app
COPY --chown=clipgallery:clipgallery . .
# Editable, so the package's root is /app: `clipgallery serve` finds rxconfig.py, alembic/ and
# .tools/node22 there. (Only what pip adds is re-owned: a chown -R of /app would copy .tools.)
RUN pip install --no-deps -e . \
    && find /app -maxdepth 1 -user root -exec chown -R clipgallery:clipgallery {} +

USER clipgallery
# Build the frontend once now: this installs its npm packages (pinned by reflex.lock/) into
# .web/node_modules, so a container never needs the npm registry. `clipgallery serve` recompiles
# the pages at every start; a new container runs the (now warm) production build once, and its
# restarts skip it while nothing changed (clipgallery/frontend_build.py).
RUN reflex export --frontend-only --no-zip --loglevel info

EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://localhost:3000/api/health', timeout=4)"
CMD ["clipgallery", "serve", "--port", "3000"]
