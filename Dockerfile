# queueguard container image.
#
# The build mirrors setup.sh, which is what the tests install and run: the same
# Debian bookworm packages by the same names (python3, python3-venv,
# python3-dev, gcc, libmilter-dev to compile pymilter; libmilter1.0.1 is the
# runtime library libmilter-dev pulls in) and the same pip step
# (`pip install --upgrade pip`, then `pip install '.[milter]'` into a venv).
# Change one, change the other: tests/integration/test_dockerfile.py checks it.
#
# Run (settings and policies mounted read-only, the quarantine on a volume):
#   docker build -t queueguard .
#   docker run -d --name queueguard -p 25:2525 -p 127.0.0.1:9925:9925 \
#     -v /etc/queueguard:/etc/queueguard:ro -v queueguard-state:/var/lib/queueguard queueguard
# /etc/queueguard/queueguard.yaml must listen on all interfaces inside the
# container (smtp.listen: 0.0.0.0:2525, metrics: 0.0.0.0:9925) and keep
# quarantine.directory under /var/lib/queueguard; `policies: policies` resolves
# to /etc/queueguard/policies. Port 25 inside works too (Docker lets
# unprivileged users bind low ports in the container's network namespace).
# The status page and /status.json show recipients, so with metrics on
# 0.0.0.0 the settings need status.password_hash (`docker run --rm -it
# queueguard passwd` prints it) or status.token_file (a file uid 10025 can read
# in the mounted /etc/queueguard): serve refuses to start without one
# (docs/settings.md#status).
# /metrics, /healthz (the HEALTHCHECK below) and /readyz stay open; 9925 is
# published on the host's loopback above: widen it only for a remote Prometheus.

# ---- builder: compilers and headers, never shipped --------------------------
FROM debian:bookworm-slim AS builder
# Versions come from bookworm, exactly as setup.sh installs them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libmilter-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY queueguard ./queueguard
# The venv lives at its final path: its scripts carry absolute shebangs.
RUN python3 -m venv /opt/queueguard/.venv \
 && /opt/queueguard/.venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/queueguard/.venv/bin/pip install --no-cache-dir '.[milter]'

# ---- final: interpreter, libmilter runtime, the venv ----------------------------
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libmilter1.0.1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10025 queueguard \
 && useradd --system --uid 10025 --gid queueguard --home-dir /var/lib/queueguard --no-create-home \
      --shell /usr/sbin/nologin queueguard \
 && mkdir -p /etc/queueguard/policies /var/lib/queueguard/quarantine \
 && chown -R queueguard:queueguard /var/lib/queueguard \
 && chmod 0750 /var/lib/queueguard \
 && chmod 0700 /var/lib/queueguard/quarantine
COPY --from=builder /opt/queueguard/.venv /opt/queueguard/.venv
ENV PATH=/opt/queueguard/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    QUEUEGUARD_HEALTHZ=http://127.0.0.1:9925/healthz
WORKDIR /etc/queueguard
VOLUME ["/var/lib/queueguard"]
# A fixed numeric id: the quarantine volume keeps its owner across image
# rebuilds, and orchestrators can check runAsNonRoot.
USER 10025:10025
EXPOSE 25 2525 9925
# No curl in the image: the interpreter we ship does the request. A non-2xx
# answer or no answer raises, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['QUEUEGUARD_HEALTHZ'], timeout=4)"]
ENTRYPOINT ["queueguard"]
CMD ["serve", "--settings", "/etc/queueguard/queueguard.yaml"]
