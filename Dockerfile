# syntax=docker/dockerfile:1
# Archipelag.io coordinator for Islands. One image runs every process:
#   web:     the default command (daphne)
#   watcher: python manage.py watch_islands
#   bridge:  python manage.py nats_bridge
# See docs/deploy.md for a compose file and the environment it needs.

ARG PYTHON_VERSION=3.12

# --- Build: install dependencies into a virtualenv -----------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN pip install .
COPY . .
# Collect static files at build time; whitenoise serves them with hashed
# names. The key is a throwaway: collectstatic signs nothing.
RUN DEBUG=0 SECRET_KEY=collectstatic-only-build-key STATIC_ROOT=/src/staticfiles \
    python manage.py collectstatic --noinput

# --- Run: the app, its virtualenv and static files, as a non-root user ---------
FROM python:${PYTHON_VERSION}-slim AS run
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DEBUG=0 \
    STATIC_ROOT=/app/staticfiles \
    PORT=8000
RUN groupadd --system app && useradd --system --gid app --home-dir /app --no-create-home app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build --chown=root:root /src/manage.py ./
COPY --from=build --chown=root:root /src/archipelag ./archipelag
COPY --from=build --chown=root:root /src/pairing ./pairing
COPY --from=build --chown=root:root /src/islands ./islands
COPY --from=build --chown=root:root /src/karma ./karma
COPY --from=build --chown=root:root /src/simulator ./simulator
COPY --from=build --chown=root:root /src/templates ./templates
COPY --from=build --chown=root:root /src/static ./static
COPY --from=build --chown=root:root /src/staticfiles ./staticfiles
USER app
EXPOSE 8000
# /healthz checks the database and the channel layer. It must be asked with a
# host name from ALLOWED_HOSTS, so the check sends the first one.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; h=(os.environ.get('ALLOWED_HOSTS') or 'localhost').split(',')[0].strip(); r=u.urlopen(u.Request('http://127.0.0.1:%s/healthz' % os.environ.get('PORT','8000'), headers={'Host': h, 'X-Forwarded-Proto': 'https'}), timeout=4); sys.exit(0 if r.status == 200 else 1)"]
# daphne with request bodies bounded while they arrive (archipelag/server.py).
# An endpoint string instead of -b/-p: Twisted's default listen backlog of 50
# drops connections when hundreds of pages open their websockets at once.
CMD ["sh", "-c", "exec python -m archipelag.server -e \"tcp:port=$PORT:interface=0.0.0.0:backlog=1024\" archipelag.asgi:application"]
