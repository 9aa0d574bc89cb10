#!/bin/sh
# demo-client's container entrypoint: write the gRPC xDS bootstrap (zone from ECS task metadata v4,
# via `cloudmap-xds bootstrap`), then serve /describe through the control plane.
#   XDS_SERVER_URI      control plane host:port (required), e.g. control-plane.cloudmap-xds.internal:18000
#   DEMO_TARGET         what to dial (default xds:///echo.demo)
#   DEMO_CLIENT_LISTEN  HTTP listen address (default 0.0.0.0:8080)
# Extra arguments go to `demo-client serve`.
set -eu

: "${XDS_SERVER_URI:?set XDS_SERVER_URI to the control plane address, host:port}"
bootstrap=/tmp/bootstrap.json

cloudmap-xds bootstrap --server-uri "$XDS_SERVER_URI" --output "$bootstrap"
export GRPC_XDS_BOOTSTRAP="$bootstrap"
exec demo-client serve --listen "${DEMO_CLIENT_LISTEN:-0.0.0.0:8080}" --target "${DEMO_TARGET:-xds:///echo.demo}" "$@"
