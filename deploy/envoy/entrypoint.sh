#!/usr/bin/env bash
# Starts Envoy with the bootstrap template in $ENVOY_BOOTSTRAP_TEMPLATE (deploy/envoy/bootstrap.yaml),
# filling in who and where this task is. It runs in the stock envoyproxy/envoy image, which has
# bash but no curl, so the task metadata is read over bash's /dev/tcp. The CDK stack passes this
# file as `bash -c` and the template as an environment variable: no image of our own is needed.
#
# Inputs: XDS_HOST (required), XDS_PORT (default 18000), NODE_CLUSTER (default demo-client),
#   ECS_CONTAINER_METADATA_URI_V4 (set by ECS: zone and task ARN), AWS_REGION (else the zone
#   minus its letter), ENVOY_ZONE / ENVOY_NODE_ID (skip the metadata lookup, e.g. outside ECS).
# Extra arguments go to envoy. Write variables as $NAME or with an operator (${NAME:-…}), never as
# a bare dollar-brace name: the script sits in a CloudFormation template, whose linters read that
# as an Fn::Sub parameter.
set -euo pipefail

die() { echo "envoy-entrypoint: $*" >&2; exit 1; }

# GET $ECS_CONTAINER_METADATA_URI_V4/task (a plain-HTTP link-local endpoint).
task_metadata() {
  local url=${ECS_CONTAINER_METADATA_URI_V4#http://}
  local authority=${url%%/*} path="/${url#*/}/task"
  local host=${authority%:*} port=80
  [[ $authority == *:* ]] && port=${authority##*:}
  exec 3<>"/dev/tcp/$host/$port" || die "cannot connect to $authority"
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$authority" >&3
  cat <&3
  exec 3<&-
}

# The string value of the first "KEY": "value" in a JSON document (enough for the flat fields used).
json_field() {
  local re="\"$2\"[[:space:]]*:[[:space:]]*\"([^\"]*)\""
  if [[ $1 =~ $re ]]; then printf '%s' "${BASH_REMATCH[1]}"; fi
}

zone=${ENVOY_ZONE:-}
node_id=${ENVOY_NODE_ID:-}
if [[ -z $zone ]]; then
  [[ -n ${ECS_CONTAINER_METADATA_URI_V4:-} ]] || die "set ENVOY_ZONE, or run on ECS (no ECS_CONTAINER_METADATA_URI_V4)"
  doc=$(task_metadata)
  zone=$(json_field "$doc" AvailabilityZone)
  [[ -n $zone ]] || die "no AvailabilityZone in $ECS_CONTAINER_METADATA_URI_V4/task"
  [[ -n $node_id ]] || node_id=$(json_field "$doc" TaskARN)
fi
node_id=${node_id:-${HOSTNAME:-envoy}}
region=${AWS_REGION:-${zone%[a-z]}}

config=${ENVOY_BOOTSTRAP_TEMPLATE:?set ENVOY_BOOTSTRAP_TEMPLATE to the bootstrap template}
config=${config//@NODE_ID@/$node_id}
config=${config//@NODE_CLUSTER@/${NODE_CLUSTER:-demo-client}}
config=${config//@REGION@/$region}
config=${config//@ZONE@/$zone}
config=${config//@XDS_HOST@/${XDS_HOST:?set XDS_HOST to the control plane host name}}
config=${config//@XDS_PORT@/${XDS_PORT:-18000}}

echo "envoy-entrypoint: node $node_id in $region/$zone, ADS to $XDS_HOST:${XDS_PORT:-18000}" >&2
exec envoy --config-yaml "$config" "$@"
