FROM python:3.11-slim

WORKDIR /app
COPY requirements.txt .
# tzdata: slim images have no zone database, which --timezone needs.
# redis: the Redis store (--store=redis://…); loaded only when that store is chosen.
RUN pip install --no-cache-dir -r requirements.txt tzdata 'redis[hiredis]>=5,<7' \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir -p /app/data \
 && chown gateway:gateway /app/data
COPY gateway.py users.yaml ./

# Numeric, so that the host and Kubernetes (runAsNonRoot) can tell it is not root.
USER 10001:10001
ENV GATEWAY_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/app/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('GATEWAY_PORT', '8000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status.php', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["python", "gateway.py"]
