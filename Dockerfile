# Images of ipam's Python services, one multi-stage file:
#   runtime — the allocator and the worker: the package and its dependencies only;
#   dev     — runtime plus the dev extras (moto, pytest, ruff, matplotlib), ghz, dev/ (the local EC2, the
#             demo seed) and bench/.

# ghz for the load profiles; keep in step with the Makefile's GHZ_VERSION.
FROM golang:1.23 AS ghz
ARG GHZ_VERSION=v0.121.0
RUN CGO_ENABLED=0 GOBIN=/out go install github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}

# The generated code (make proto's command).
FROM python:3.11-slim AS gen
WORKDIR /src
RUN pip install --no-cache-dir 'grpcio-tools>=1.66'
COPY proto ./proto
RUN mkdir -p gen \
 && python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen proto/ipam/v1/*.proto \
 && touch gen/ipam/__init__.py gen/ipam/v1/__init__.py

FROM python:3.11-slim AS runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY --from=gen /src/gen ./gen
COPY services ./services
COPY clients ./clients
RUN pip install --no-cache-dir . && rm -rf build
USER nobody
CMD ["ipam-allocator"]

FROM runtime AS dev
USER root
RUN pip install --no-cache-dir '.[dev]' && rm -rf build \
 && mkdir -p /data && chown nobody /data
COPY --from=ghz /out/ghz /usr/local/bin/ghz
COPY dev ./dev
COPY bench ./bench
USER nobody
