#!/usr/bin/env bash
# Tests k8s/base/agent-zone.sh, the agent's zone init container (k8s/validate.sh step 4).
#
#   validate/agent-zone-test.sh PYTHON
#
# 1. The zone it derives from Node objects (--from-json).
# 2. The whole in-pod path against a fake API server on 127.0.0.1 (TLS with a throwaway CA,
#    bearer token, the node's URL): the zone file written, and a non-zero exit when the API
#    refuses. Skipped, saying so, without openssl or curl.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$1
script=base/agent-zone.sh

fail() {
    echo "k8s/validate/agent-zone-test.sh: $*" >&2
    exit 1
}

zone_is() {
    local got
    got=$(printf '%s' "$2" | sh "$script" --from-json)
    [ "$got" = "$1" ] || fail "expected zone '$1', got '$got' for $2"
}
zone_is "eu-west1/eu-west1-b" \
    '{"metadata":{"labels":{"topology.kubernetes.io/region":"EU-West1","topology.kubernetes.io/zone":"eu-west1-b"},"annotations":{"a":"{\"topology.kubernetes.io/zone\":\"not-this\"}"}}}'
zone_is "rack_7" '{"metadata":{"labels":{"topology.kubernetes.io/zone":"rack_7"}}}'
zone_is "" '{"metadata":{"labels":{"kubernetes.io/hostname":"n1"}}}'
long_region=$(printf 'r%.0s' $(seq 60))
zone_is "zone-b" "{\"metadata\":{\"labels\":{\"topology.kubernetes.io/region\":\"$long_region\",\"topology.kubernetes.io/zone\":\"$(printf 'Zone-B')\"}}}"

if ! command -v openssl >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
    echo "k8s/validate/agent-zone-test.sh: no openssl or curl: skipping the fake API server test" >&2
    exit 0
fi

dir=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir "$dir/sa"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=kubernetes \
    -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$dir/key.pem" -out "$dir/sa/ca.crt" 2>/dev/null
echo test-token >"$dir/sa/token"

# Answers GET /api/v1/nodes/node-a with the token, 403 otherwise; prints its port.
"$py" - "$dir" >"$dir/port" <<'EOF' &
import http.server, json, os, ssl, sys

d = sys.argv[1]
node = {"kind": "Node", "metadata": {"name": "node-a", "labels": {
    "topology.kubernetes.io/region": "us-east-1", "topology.kubernetes.io/zone": "us-east-1a"}}}

class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = (self.headers.get("Authorization") == "Bearer test-token"
              and self.path == "/api/v1/nodes/node-a")
        body = json.dumps(node if ok else {"kind": "Status", "code": 403}, separators=(",", ":"))
        self.send_response(200 if ok else 403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass

srv = http.server.HTTPServer(("127.0.0.1", 0), Api)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(d, "sa/ca.crt"), os.path.join(d, "key.pem"))
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.handle_request()
srv.handle_request()
EOF
server=$!
for _ in $(seq 100); do
    [ -s "$dir/port" ] && break
    kill -0 "$server" 2>/dev/null || fail "the fake API server did not start"
    sleep 0.05
done
port=$(cat "$dir/port")

in_pod() {
    env SA_DIR="$dir/sa" ZONE_FILE="$dir/zone" NODE_NAME="$1" \
        KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT="$port" \
        sh "$script" >/dev/null 2>&1
}
in_pod node-a || fail "the in-pod run failed against the fake API server"
[ "$(cat "$dir/zone")" = "us-east-1/us-east-1a" ] || fail "zone file holds '$(cat "$dir/zone")'"
rm "$dir/zone"
if in_pod node-b; then
    fail "exit 0 although the API server refused"
fi
[ ! -e "$dir/zone" ] || fail "a zone file was written although the API server refused"
wait "$server"
server=""
