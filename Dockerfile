FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 REFLEX_USE_NPM=1 REFLEX_TELEMETRY_ENABLED=false \
    REFLEX_CHECK_LATEST_VERSION=0
RUN apt-get update && apt-get install -y --no-install-recommends npm make && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
# CPU wheels of the pinned torch pair keep the image small; open_clip does not care which build it gets.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY . .
RUN pip install --no-deps -e . && make node

EXPOSE 3000
CMD ["clipgallery", "serve", "--port", "3000"]
