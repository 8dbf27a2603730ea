# One image for every Python service of ipam (allocator, worker, seed, the local EC2, load).

# ghz for the load profiles; keep in step with the Makefile's GHZ_VERSION.
FROM golang:1.23 AS ghz
ARG GHZ_VERSION=v0.121.0
RUN CGO_ENABLED=0 GOBIN=/out go install github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
RUN pip install --no-cache-dir 'grpcio-tools>=1.66' \
 && mkdir -p gen \
 && python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen proto/ipam/v1/*.proto \
 && touch gen/ipam/__init__.py gen/ipam/v1/__init__.py
COPY services ./services
COPY clients ./clients
RUN pip install --no-cache-dir -e '.[dev]'
COPY --from=ghz /out/ghz /usr/local/bin/ghz
COPY bench ./bench
USER nobody
CMD ["ipam-allocator"]
