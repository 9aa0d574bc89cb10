# Sourced by install-peers.sh and test-deploy.sh: make_venv DIR creates a Python venv with pip.
# `python -m venv` hides why its ensurepip step failed (one CI run on a clean clone stopped at
# "ensurepip ... returned non-zero exit status 1" and nothing else), so on failure this says how
# much disk is left, then builds the venv again without pip and runs ensurepip in the open: a
# transient failure is retried once, and a lasting one prints its real cause.
make_venv() {
    local dir="$1"
    rm -rf "$dir"
    if "$PYTHON" -m venv "$dir"; then
        return 0
    fi
    echo "make_venv: '$PYTHON -m venv $dir' failed; disk left:" >&2
    df -h "$(dirname "$dir")" "${TMPDIR:-/tmp}" >&2 || true
    rm -rf "$dir"
    "$PYTHON" -m venv --without-pip "$dir"
    if ! "$dir/bin/python" -m ensurepip --upgrade --default-pip; then
        echo "make_venv: ensurepip failed in $dir (output above); is python3's ensurepip module installed and is there disk left?" >&2
        return 1
    fi
}
