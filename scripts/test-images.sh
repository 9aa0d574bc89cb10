#!/usr/bin/env bash
# Builds the three container images from the Dockerfile with podman and runs them (issue 16):
#   1. installs podman, runc and debootstrap (Debian) when missing;
#   2. the base image: this machine reaches Debian's mirror but no container registry, so
#      debian:bookworm-slim is made here — `debootstrap --variant=minbase bookworm`, imported and
#      tagged docker.io/library/debian:bookworm-slim (cached in podman's storage);
#   3. builds the cloudmap-xds, demo-server and demo-client targets with
#      --build-arg BINARIES=prebuilt: the binaries built earlier in the run (target/debug, debug
#      info stripped, copied to target/image-bin/) instead of a release build inside the image;
#   4. runs the cloudmap-xds image against moto until its /ready answers 200, and each demo image
#      until its entrypoint answers (demo-server listening, demo-client's `--help`).
# podman's settings for machines that are themselves containers: deploy/docker/containers-ci.conf.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CONTAINERS_CONF="$ROOT/deploy/docker/containers-ci.conf"
# podman run tries to schedule HEALTHCHECKs with systemd, which these machines lack (the health
# checks are run below with `podman healthcheck run` instead): drop that one complaint.
quiet_systemd() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }
PEERS_PY="${PEERS_PY:-$ROOT/.peers/py}"
BIN_DIR="${IMAGE_BIN_SOURCE:-$ROOT/target/debug}"
BASE=docker.io/library/debian:bookworm-slim

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "==> apt-get install ${missing[*]}"
    sudo=()
    [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! podman image exists "$BASE"; then
    echo "==> base image $BASE from debootstrap (no registry reachable)"
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | podman import --quiet - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

echo "==> binaries from $BIN_DIR into target/image-bin (debug info stripped)"
mkdir -p target/image-bin
for b in cloudmap-xds demo-server demo-client; do
    [[ -x "$BIN_DIR/$b" ]] || { echo "test-images: $BIN_DIR/$b is missing (cargo build --workspace --bins)" >&2; exit 1; }
    strip --strip-debug -o "target/image-bin/$b" "$BIN_DIR/$b"
done

for target in cloudmap-xds demo-server demo-client; do
    echo "==> podman build --target $target"
    podman build --quiet --format docker --pull=never --network host --build-arg BINARIES=prebuilt \
        --target "$target" -t "localhost/$target:ci" . >/dev/null
done

free_port() { "$PEERS_PY/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MOTO_PORT="$(free_port)"
XDS_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
SERVER_PORT="$(free_port)"
containers=()
moto_pid=""
cleanup() {
    for c in "${containers[@]}"; do podman rm -f "$c" >/dev/null 2>&1 || true; done
    [[ -n $moto_pid ]] && kill "$moto_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$PEERS_PY/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >/dev/null 2>&1 &
moto_pid=$!
"$PEERS_PY/bin/python" - "$MOTO_PORT" <<'PY'
import sys, time, urllib.request
import boto3
from botocore.config import Config
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(100):
    try:
        urllib.request.urlopen(url + "/moto-api/", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
sd = boto3.client("servicediscovery", region_name="us-east-1", endpoint_url=url, aws_access_key_id="test",
                  aws_secret_access_key="test", config=Config(inject_host_prefix=False))
sd.create_http_namespace(Name="demo")
ns = next(n["Id"] for n in sd.list_namespaces()["Namespaces"] if n["Name"] == "demo")
svc = sd.create_service(Name="echo", NamespaceId=ns, HealthCheckCustomConfig={})["Service"]["Id"]
sd.register_instance(ServiceId=svc, InstanceId="i-1", Attributes={
    "AWS_INSTANCE_IPV4": "127.0.0.1", "AWS_INSTANCE_PORT": "50051", "AVAILABILITY_ZONE": "us-east-1a"})
PY

echo "==> run localhost/cloudmap-xds:ci against moto until /ready answers 200"
cp_name="cloudmap-xds-ci-$$"
containers+=("$cp_name")
quiet_systemd podman run -d --name "$cp_name" --network host \
    -e AWS_REGION=us-east-1 -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test \
    -e AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT" -e AWS_EC2_METADATA_DISABLED=true \
    localhost/cloudmap-xds:ci --namespace demo \
    --xds-listen "127.0.0.1:$XDS_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" >/dev/null
ready=""
for _ in $(seq 1 120); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/ready" || true)" == 200 ]]; then
        ready=1
        break
    fi
    sleep 0.25
done
if [[ -z $ready ]]; then
    echo "test-images: the cloudmap-xds image never answered /ready with 200; its log:" >&2
    podman logs "$cp_name" 2>&1 | tail -30 >&2
    exit 1
fi
# Outputs are captured before they are matched: `producer | grep -q` under pipefail fails when
# grep exits before the producer's last write (SIGPIPE / curl's exit 23).
config_dump="$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/config_dump")" \
    || { echo "test-images: the image's /config_dump did not answer" >&2; exit 1; }
[[ $config_dump == *'"echo.demo"'* ]] \
    || { echo "test-images: the image's /config_dump does not serve echo.demo" >&2; exit 1; }
# The image's HEALTHCHECK curls /healthz on the default admin port 9901; this run uses another
# port, so the same command is run against it (curl is in the image, the user may run it).
podman exec "$cp_name" curl -fsS "http://127.0.0.1:$ADMIN_PORT/healthz" >/dev/null \
    || { echo "test-images: curl inside the cloudmap-xds image failed (its HEALTHCHECK tool)" >&2; exit 1; }
echo "    /ready 200, echo.demo served, curl /healthz inside works (image runs as uid $(podman exec "$cp_name" id -u))"

echo "==> run localhost/demo-server:ci until it listens"
ds_name="demo-server-ci-$$"
containers+=("$ds_name")
quiet_systemd podman run -d --name "$ds_name" --network host localhost/demo-server:ci \
    --listen "127.0.0.1:$SERVER_PORT" --zone us-east-1a --instance-id ci-1 >/dev/null
listening=""
for _ in $(seq 1 80); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$SERVER_PORT") 2>/dev/null; then listening=1; break; fi
    sleep 0.25
done
[[ -n $listening ]] || { echo "test-images: demo-server image not listening; log:" >&2; podman logs "$ds_name" >&2; exit 1; }
podman exec "$ds_name" bash -c "</dev/tcp/127.0.0.1/$SERVER_PORT" \
    || { echo "test-images: the demo-server image's health check command fails" >&2; exit 1; }
echo "    demo-server listening on 127.0.0.1:$SERVER_PORT (its bash /dev/tcp health check passes)"

echo "==> localhost/demo-client:ci: the binaries run"
quiet_systemd podman run --rm --network host --entrypoint /usr/local/bin/demo-client localhost/demo-client:ci --help >/dev/null
bootstrap_json="$(quiet_systemd podman run --rm --network host --entrypoint /usr/local/bin/cloudmap-xds \
    localhost/demo-client:ci bootstrap --server-uri 127.0.0.1:18000 --zone us-east-1a --output -)"
[[ $bootstrap_json == *'"zone": "us-east-1a"'* ]] \
    || { echo "test-images: 'cloudmap-xds bootstrap' in the image printed no us-east-1a zone:" >&2; echo "$bootstrap_json" >&2; exit 1; }
echo "==> images OK"
