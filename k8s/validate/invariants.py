"""What the Kubernetes schemas cannot check in the rendered manifests (k8s/validate.sh step 3).

    python invariants.py DIR    # DIR holds one rendering per kustomization, <dir>_<name>.yaml

Prints every broken invariant and exits 1 if there is any.
"""

import pathlib
import sys

import yaml

RENDERINGS = {
    "overlays_single-node.yaml": "single-node",
    "overlays_fleet.yaml": "fleet",
    "examples_managed-stores.yaml": "managed-stores",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
TRACKER_PORT = 6969
AGENT_PORT = 6881

problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def pod_specs(objs):
    for o in objs:
        spec = o.get("spec", {})
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield o, spec["template"]["spec"]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def one(objs, kind, name, where):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    check(len(found) == 1, f"{where}: expected one {kind}/{name}, found {len(found)}")
    return found[0] if found else None


def check_rendering(where, objs):
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    ns = {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED}
    check(ns == {"fbpkg"}, f"{where}: namespaced objects are in {sorted(map(str, ns))}, not fbpkg")

    for o in objs:
        labels = o["metadata"].get("labels", {})
        check(
            labels.get("app.kubernetes.io/part-of") == "fbpkg-rs",
            f"{where}: {o['kind']}/{o['metadata']['name']} lacks app.kubernetes.io/part-of=fbpkg-rs",
        )

    # Every container, init containers too, states requests and limits for cpu and memory.
    for o, spec in pod_specs(objs):
        tmpl_labels = o["spec"]["template"]["metadata"].get("labels", {})
        selector = o["spec"]["selector"]["matchLabels"]
        check(
            all(tmpl_labels.get(k) == v for k, v in selector.items()),
            f"{where}: {o['kind']}/{o['metadata']['name']}: selector does not match its pods",
        )
        check(
            spec.get("enableServiceLinks") is False,
            f"{where}: {o['kind']}/{o['metadata']['name']}: service links would add FBPKG_* variables",
        )
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    check(
                        r in res.get(kind, {}),
                        f"{where}: {o['kind']}/{o['metadata']['name']} container {c['name']}"
                        f" has no {kind}.{r}",
                    )
            check(
                "livenessProbe" in c or c in spec.get("initContainers", []),
                f"{where}: {o['kind']}/{o['metadata']['name']} container {c['name']} has no liveness probe",
            )

    # The tracker: both probes on its HTTP port, non-root, token from a Secret.
    dep = one(objs, "Deployment", "fbpkg-tracker", where)
    if dep:
        spec = dep["spec"]["template"]["spec"]
        (c,) = [c for c in spec["containers"] if c["name"] == "tracker"]
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c.get(probe, {}).get("httpGet", {})
            check(get.get("path") == path, f"{where}: tracker {probe} is not GET {path}")
            port = get.get("port")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            check(
                ports.get(port, port) == TRACKER_PORT,
                f"{where}: tracker {probe} is not on port {TRACKER_PORT}",
            )
        env = env_of(c)
        check(
            env.get("FBPKG_TRACKER_LISTEN", {}).get("value", "").endswith(f":{TRACKER_PORT}"),
            f"{where}: tracker does not listen on {TRACKER_PORT}",
        )
        check(
            "secretKeyRef" in env.get("FBPKG_PUBLISH_TOKEN", {}).get("valueFrom", {}),
            f"{where}: FBPKG_PUBLISH_TOKEN does not come from a Secret",
        )
        check(spec["securityContext"].get("runAsNonRoot") is True, f"{where}: tracker may run as root")
        replicas = dep["spec"]["replicas"]
        peer_store = env.get("FBPKG_TRACKER_PEER_STORE", {}).get("value", "memory")
        catalog = env.get("FBPKG_TRACKER_CATALOG", {}).get("value")
        volumes = {v["name"]: v for v in spec["volumes"]}
        if RENDERINGS[where] == "single-node":
            check(replicas == 1, f"{where}: {replicas} tracker replicas, not 1")
            check(peer_store == "memory", f"{where}: peer store is {peer_store}, not memory")
            check(catalog is None, f"{where}: catalog is {catalog}, not the data dir")
            claim = volumes["data"].get("persistentVolumeClaim", {}).get("claimName")
            check(
                claim is not None and ("PersistentVolumeClaim", claim) in names,
                f"{where}: the tracker's data dir is not on a PersistentVolumeClaim of the overlay",
            )
            check(
                dep["spec"].get("strategy", {}).get("type") == "Recreate",
                f"{where}: one ReadWriteOnce volume needs strategy Recreate",
            )
        else:
            check(replicas == 3, f"{where}: {replicas} tracker replicas, not 3")
            check(
                peer_store.startswith(("redis://", "rediss://")),
                f"{where}: peer store {peer_store} is not Redis",
            )
            check(
                catalog is not None and catalog.startswith("postgres://"),
                f"{where}: catalog {catalog} is not PostgreSQL",
            )
            check(
                catalog is None or "$(FBPKG_POSTGRES_PASSWORD)" in catalog,
                f"{where}: the catalog URL does not take its password from the Secret",
            )
            check(
                "secretKeyRef" in env.get("FBPKG_POSTGRES_PASSWORD", {}).get("valueFrom", {}),
                f"{where}: FBPKG_POSTGRES_PASSWORD does not come from a Secret",
            )
            order = list(env)
            check(
                "FBPKG_POSTGRES_PASSWORD" in order
                and "FBPKG_TRACKER_CATALOG" in order
                and order.index("FBPKG_POSTGRES_PASSWORD") < order.index("FBPKG_TRACKER_CATALOG"),
                f"{where}: $(FBPKG_POSTGRES_PASSWORD) is only expanded if defined before the URL",
            )
            in_cluster = RENDERINGS[where] == "fleet"
            for store, host in (("redis", peer_store), ("postgres", catalog or "")):
                has = ("StatefulSet", f"fbpkg-{store}") in names
                check(has == in_cluster, f"{where}: StatefulSet fbpkg-{store} present: {has}")
                check(
                    (f"@fbpkg-{store}:" in host or f"//fbpkg-{store}:" in host) == in_cluster,
                    f"{where}: the {store} URL {host} does not match where {store} runs",
                )
        one(objs, "Service", "fbpkg-tracker", where)
        one(objs, "PodDisruptionBudget", "fbpkg-tracker", where)

    # The agent: host network, peer port, both hostPaths, zone from the init container.
    ds = one(objs, "DaemonSet", "fbpkg-agent", where)
    if ds:
        spec = ds["spec"]["template"]["spec"]
        (c,) = [c for c in spec["containers"] if c["name"] == "agent"]
        env = env_of(c)
        check(spec.get("hostNetwork") is True, f"{where}: the agent is not on the host network")
        check(
            spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
            f"{where}: the agent cannot resolve the tracker's Service on the host network",
        )
        check(
            env.get("FBPKG_LISTEN", {}).get("value", "").endswith(f":{AGENT_PORT}"),
            f"{where}: the agent does not listen on {AGENT_PORT}",
        )
        check(
            any(p.get("hostPort") == AGENT_PORT for p in c.get("ports", [])),
            f"{where}: the agent's peer port is not a host port",
        )
        host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        for var in ("FBPKG_STATE_DIR", "FBPKG_CACHE_DIR"):
            path = env.get(var, {}).get("value")
            vol = [n for n, p in mounts.items() if p == path]
            check(
                len(vol) == 1 and host_paths.get(vol[0]) == path,
                f"{where}: {var}={path} is not a hostPath mounted at the same path",
            )
        tracker = env.get("FBPKG_TRACKER", {}).get("value", "")
        check(
            tracker == f"http://fbpkg-tracker:{TRACKER_PORT}",
            f"{where}: the agent's tracker {tracker} is not the Service",
        )
        init = [i["name"] for i in spec.get("initContainers", [])]
        check("zone" in init, f"{where}: no zone init container")
        check(
            "/run/fbpkg-zone/zone" in " ".join(c.get("command", [])),
            f"{where}: the agent does not read the zone file",
        )
        sa = spec.get("serviceAccountName")
        bindings = [
            b
            for b in objs
            if b["kind"] == "ClusterRoleBinding"
            and any(
                s["kind"] == "ServiceAccount"
                and s["name"] == sa
                and s.get("namespace") == ds["metadata"]["namespace"]
                for s in b["subjects"]
            )
        ]
        check(bindings, f"{where}: no ClusterRoleBinding for ServiceAccount {sa} in its namespace")
        for b in bindings:
            role = one(objs, "ClusterRole", b["roleRef"]["name"], where)
            if role:
                check(
                    any("nodes" in r["resources"] and "get" in r["verbs"] for r in role["rules"]),
                    f"{where}: ClusterRole {role['metadata']['name']} cannot get nodes",
                )


def main():
    out = pathlib.Path(sys.argv[1])
    for file in RENDERINGS:
        path = out / file
        objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
        check_rendering(file, objs)
    for p in problems:
        print(f"k8s/validate/invariants.py: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"k8s/validate/invariants.py: {len(RENDERINGS)} renderings hold every invariant", file=sys.stderr)


if __name__ == "__main__":
    main()
