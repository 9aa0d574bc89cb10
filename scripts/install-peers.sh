#!/usr/bin/env bash
# Installs the real peers the integration tests run against into the git-ignored .peers/:
#   .peers/py  — Python venv with moto[server] (Cloud Map emulator), boto3, grpcio (+tools,
#                health-checking) and pytest, pinned in tests/requirements.txt.
# Idempotent: a stamp file holds a hash of the requirements (and of this script and the
# interpreter version); when it matches, the script exits at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="$ROOT/.peers"
VENV="$PEERS/py"
REQ="$ROOT/tests/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3}"

command -v "$PYTHON" >/dev/null || { echo "install-peers: $PYTHON not found" >&2; exit 1; }

want="$( { cat "$REQ"; cat "${BASH_SOURCE[0]}"; "$PYTHON" -c 'import sys; print(sys.version)'; } \
        | sha256sum | cut -d' ' -f1)"

if [[ -x "$VENV/bin/python" && -x "$VENV/bin/moto_server" && -f "$STAMP" \
      && "$(cat "$STAMP")" == "$want" ]]; then
    echo "install-peers: .peers/py up to date"
    exit 0
fi

echo "install-peers: installing Python peers into .peers/py"
mkdir -p "$PEERS"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"

# Prove every peer is importable/runnable before stamping.
"$VENV/bin/python" - <<'PY'
import boto3, botocore, grpc, grpc_tools, grpc_health, moto, pytest  # noqa: F401
print(f"install-peers: moto {moto.__version__}, boto3 {boto3.__version__}, grpcio {grpc.__version__}, pytest {pytest.__version__}")
PY
test -x "$VENV/bin/moto_server"

echo "$want" > "$STAMP"
echo "install-peers: done"
