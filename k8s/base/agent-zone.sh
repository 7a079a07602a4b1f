#!/bin/sh
# Writes this node's zone, as `fbpkg-rs agent --zone` wants it, to $ZONE_FILE.
#
# The agent's init container runs this: the downward API cannot hand a pod its node's labels,
# so it reads its own Node object from the API server (ServiceAccount fbpkg-agent, allowed
# `get nodes`). The zone is the node's topology labels, most general first:
# `<topology.kubernetes.io/region>/<topology.kubernetes.io/zone>`, lowercased, anything
# outside [a-z0-9._-] turned into `-` (the agent's zone syntax). A node with neither label
# gets an empty file and its agent runs without a zone; an API error fails the init
# container, so a broken RBAC setup shows as a crash loop rather than agents silently
# without locality.
#
#   agent-zone.sh                 in the pod: NODE_NAME set, token mounted
#   agent-zone.sh --from-json     test: the Node object on stdin, the zone on stdout
# (k8s/validate/agent-zone-test.sh tests both, the first against a fake API server.)
set -eu

# Label values are [A-Za-z0-9._-] only, so a label appears in the API server's compact JSON
# as "key":"value" with nothing to unescape; in an annotation holding JSON the same text is
# escaped (\"key\":\"value\") and does not match.
label() {
    printf '%s' "$2" | grep -o "\"$1\":\"[A-Za-z0-9._-]*\"" | head -n 1 | sed 's/^.*:"//; s/"$//' || true
}

segment() {
    # Label values are ASCII, and the zone syntax wants exactly a-z.
    # shellcheck disable=SC2018,SC2019
    printf '%s' "$1" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9._\n-' '-'
}

zone_of() {
    region=$(label 'topology\.kubernetes\.io/region' "$1")
    zone=$(label 'topology\.kubernetes\.io/zone' "$1")
    out=""
    [ -n "$region" ] && out=$(segment "$region")
    if [ -n "$zone" ]; then
        [ -n "$out" ] && out="$out/"
        out="$out$(segment "$zone")"
    fi
    # A zone is at most 64 characters; two long labels can exceed that, the zone alone cannot.
    [ "${#out}" -gt 64 ] && out=$(segment "$zone")
    printf '%s' "$out"
}

if [ "${1:-}" = "--from-json" ]; then
    zone_of "$(cat)"
    echo
    exit 0
fi

sa=${SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount} # SA_DIR: tests only
: "${NODE_NAME:?NODE_NAME must be set (downward API spec.nodeName)}"
: "${ZONE_FILE:=/run/fbpkg-zone/zone}"
host=$KUBERNETES_SERVICE_HOST
case "$host" in *:*) host="[$host]" ;; esac # IPv6
node=$(curl --silent --show-error --fail --max-time 10 \
    --cacert "$sa/ca.crt" \
    -H "Authorization: Bearer $(cat "$sa/token")" \
    "https://${host}:${KUBERNETES_SERVICE_PORT}/api/v1/nodes/${NODE_NAME}")
z=$(zone_of "$node")
printf '%s\n' "$z" >"$ZONE_FILE.tmp"
mv "$ZONE_FILE.tmp" "$ZONE_FILE"
echo "node ${NODE_NAME}: zone '${z}'"
