# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t cbd-api .     # CPU, slim: no torch at all
#   docker build --target worker -t cbd-worker .  # CUDA torch, runs the jobs
#
# The package depends on torch (the library needs it), but the web process imports only the
# torch-free modules (app/, worker/queue.py, worker/tokens.py, cbd.core; an import-linter
# contract in pyproject.toml keeps it so). The api image therefore installs the package with
# --no-deps plus exactly the torch-free requirements, pinned from pyproject.toml, and proves at
# build time that the app imports without torch. Both images install the package itself (not
# the source tree): the chain recipes are package data of the `anchors` package, read with
# importlib.resources, and `cbd serve`/`cbd worker` are found through the package's entry points.

ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CBD_HOME=/data CBD_CHAINS=/data/chains CBD_ARTIFACTS=/data/artifacts CBD_ASSETS=/data/assets
RUN useradd --create-home --uid 10001 --user-group cbd \
 && mkdir -p /data/chains /data/artifacts /data/assets && chown -R cbd:cbd /data
WORKDIR /app

# ---- api: FastAPI + RQ client, no torch ------------------------------------------------------
FROM base AS api
COPY pyproject.toml ./
RUN python - > /tmp/api-requirements.txt <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
# cbd.core, the CLI entry point, `cbd fetch`; obstore (an S3 store) and filelock (the store budget)
torch_free = {"pydantic", "typer", "rich", "httpx", "obstore", "filelock"}
core = [d for d in project["dependencies"] if re.split(r"[=<>!~\[ ]", d)[0] in torch_free]
print("\n".join(core + project["optional-dependencies"]["service"]))
PY
RUN pip install -r /tmp/api-requirements.txt
COPY pyproject.toml README.md ./
COPY cbd ./cbd
COPY app ./app
COPY worker ./worker
COPY anchors ./anchors
RUN pip install --no-deps . && rm -rf /app/* \
 && cd / && python -c "import sys, app.main; assert 'torch' not in sys.modules; app.main.create_app()"
USER cbd
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", \
     "--limit-concurrency", "64", "--proxy-headers"]

# ---- worker: CUDA torch, the whole library ----------------------------------------------------
FROM base AS worker
# The CUDA build of the torch version pyproject.toml pins (2.13.0+cu128 satisfies torch==2.13.0).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY cbd ./cbd
COPY app ./app
COPY worker ./worker
COPY anchors ./anchors
RUN pip install ".[service]" && rm -rf /app/* \
 && cd / && python -c "import torch, worker.jobs; from cbd.core.recipe import list_recipes; assert list_recipes(); print('torch', torch.__version__)" \
 && cbd --help | grep -q worker
USER cbd
# One long-lived SimpleWorker per GPU: no fork after torch, anchors stay loaded between jobs.
CMD ["cbd", "worker", "--queues", "fast,slow"]
