#!/usr/bin/env bash
# THE one command that runs every test on a fresh machine:
#   1. installs the real peers (.peers/py: moto, boto3, grpcio, pytest),
#   2. builds all binaries, 3. runs the Rust tests,
#   4. checks deploy/ (scripts/test-deploy.sh: hadolint, cdk synth, cfn-lint, CDK tests) and
#      builds and runs the container images (scripts/test-images.sh, podman),
#   5. runs the Python integration suite (tests/integration) against the built binaries.
# Extra arguments are passed to pytest (e.g. scripts/test.sh -k zone -x).
# CLOUDMAP_XDS_BIN / DEMO_SERVER_BIN override the binaries under test.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

"$ROOT/scripts/install-peers.sh"

echo "==> cargo build --workspace --bins"
cargo build --workspace --bins

echo "==> cargo test --workspace"
cargo test --workspace

echo "==> load generator smoke run (scripts/bench.sh --smoke: N = 200, in-process and against moto)"
"$ROOT/scripts/bench.sh" --smoke

echo "==> deploy checks (Dockerfile, CDK synth, cfn-lint, CDK assertion tests)"
"$ROOT/scripts/test-deploy.sh"

echo "==> container images (podman build of the Dockerfile's targets, then run against moto)"
PEERS_PY="$ROOT/.peers/py" "$ROOT/scripts/test-images.sh"

export CLOUDMAP_XDS_BIN="${CLOUDMAP_XDS_BIN:-$ROOT/target/debug/cloudmap-xds}"
export DEMO_SERVER_BIN="${DEMO_SERVER_BIN:-$ROOT/target/debug/demo-server}"
export PEERS_PY="${PEERS_PY:-$ROOT/.peers/py}"

echo "==> pytest tests/integration (cloudmap-xds=$CLOUDMAP_XDS_BIN demo-server=$DEMO_SERVER_BIN)"
# A missing peer or binary fails the suite (conftest raises, it never skips); pytest's
# exit code 5 (no tests collected) is non-zero too, so it fails this script.
exec "$PEERS_PY/bin/python" -m pytest "$ROOT/tests/integration" -ra "$@"
