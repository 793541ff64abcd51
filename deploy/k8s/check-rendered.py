#!/usr/bin/env python3
"""Checks a rendered kustomization (`kubectl kustomize DIR`) for what a schema cannot see:
that the pieces fit each other and fit how vowd is configured. Run by validate.sh with the
venv's Python (PyYAML comes with kubernetes-validate).

    check-rendered.py RENDERED.yaml                      # a base or overlay rendering
    check-rendered.py --service-monitor SM.yaml RENDERED.yaml

Prints one line per failed check and a summary; exits 1 if any check failed.
"""

import re
import sys

import yaml

failures = []
passed = 0


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(what)
    return ok


def matches(selector, labels):
    """A matchLabels selector (or a Service's plain selector) selects these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_rendering(docs):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    sets = by_kind.get("StatefulSet", [])
    if not check(len(sets) == 1, f"exactly one StatefulSet (found {len(sets)})"):
        return
    sts = sets[0]
    name, ns = sts["metadata"]["name"], sts["metadata"].get("namespace")
    spec = sts["spec"]
    tmpl = spec["template"]
    pod_labels = tmpl["metadata"].get("labels", {})
    pod = tmpl["spec"]

    # Namespace: everything in one, and the Namespace object (if any) is that one.
    check(ns is not None, "the StatefulSet has a namespace")
    for d in docs:
        if d["kind"] == "Namespace":
            check(d["metadata"]["name"] == ns, f"Namespace object {d['metadata']['name']} is the StatefulSet's ({ns})")
        else:
            check(d["metadata"].get("namespace") == ns, f"{d['kind']}/{d['metadata']['name']} is in namespace {ns}")

    # The StatefulSet itself.
    start = spec.get("ordinals", {}).get("start", 0)
    check(start >= 1, f"spec.ordinals.start >= 1 (node ids come from the ordinal; 0 is invalid), is {start}")
    replicas = spec.get("replicas", 1)
    check(spec.get("podManagementPolicy") == "Parallel", "podManagementPolicy: Parallel")
    check(spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate", "updateStrategy RollingUpdate")
    check(matches(spec["selector"]["matchLabels"], pod_labels), "the StatefulSet's selector selects its pod template")
    check(pod.get("terminationGracePeriodSeconds", 30) >= 30, "terminationGracePeriodSeconds >= 30")
    check(pod.get("automountServiceAccountToken") is False, "automountServiceAccountToken: false")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001 and psc.get("fsGroup") == 10001,
          "pod runs as non-root uid 10001 with fsGroup 10001")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")

    containers = {c["name"]: c for c in pod["containers"]}
    if not check("vowd" in containers, "a container named vowd"):
        return
    c = containers["vowd"]
    csc = c.get("securityContext", {})
    check(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
          and csc.get("capabilities", {}).get("drop") == ["ALL"],
          "vowd: read-only root, no privilege escalation, all capabilities dropped")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(pre[1]) if len(pre) == 2 and pre[0].endswith("sleep") else 0
    check(pod.get("terminationGracePeriodSeconds", 30) >= pause + 20,
          f"terminationGracePeriodSeconds covers the preStop pause ({pause} s) + hand-off, 5 s drain and flush")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports == {"grpc": 7001, "http": 7081, "peer": 7101}, f"container ports grpc/http/peer = 7001/7081/7101, are {ports}")

    # Environment: the ConfigMap(s) of envFrom, then env (which wins).
    cms = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind.get("ConfigMap", [])}
    env = {}
    for ef in c.get("envFrom", []):
        ref = ef.get("configMapRef", {}).get("name")
        if ref is not None and check(ref in cms, f"envFrom ConfigMap {ref} is in the rendering"):
            env.update(cms[ref])
    defined = set(env)
    for e in c.get("env", []):
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            check(ref in defined, f"env {e['name']} refers to $({ref}), defined before it")
        defined.add(e["name"])
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    field = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c.get("env", [])
             if "fieldRef" in e.get("valueFrom", {})}
    check(field.get("POD_NAME") == "metadata.name" and field.get("POD_NAMESPACE") == "metadata.namespace",
          "POD_NAME and POD_NAMESPACE from the downward API")
    check(env.get("VOW_NODE_ID_FROM_HOSTNAME") == "true", "VOW_NODE_ID_FROM_HOSTNAME=true")
    check("VOW_NODE_ID" not in env, "no VOW_NODE_ID (it conflicts with VOW_NODE_ID_FROM_HOSTNAME)")
    check(port_of(env.get("VOW_GRPC_ADDR", ":7001")) == ports.get("grpc"), "VOW_GRPC_ADDR's port is the grpc port")
    check(port_of(env.get("VOW_HTTP_ADDR", ":7081")) == ports.get("http"), "VOW_HTTP_ADDR's port is the http port")
    peer_port = port_of(env["VOW_PEER_ADDR"]) if "VOW_PEER_ADDR" in env else ports.get("grpc", 0) + 100
    check(peer_port == ports.get("peer"), "the peer port (VOW_PEER_ADDR, or gRPC + 100) is the peer container port")
    check("VOW_PEER_ADDR" not in env or "VOW_ADVERTISE_PEER_ADDR" in env,
          "VOW_PEER_ADDR is not set without VOW_ADVERTISE_PEER_ADDR")
    svc_name = spec["serviceName"]
    host = f"{name}-{{i}}.{svc_name}.{ns}.svc.cluster.local:{ports.get('grpc')}"
    check(env.get("VOW_ADVERTISE_ADDR") == f"$(POD_NAME).{svc_name}.$(POD_NAMESPACE).svc.cluster.local:{ports.get('grpc')}",
          f"VOW_ADVERTISE_ADDR is the pod's name through {svc_name}, is {env.get('VOW_ADVERTISE_ADDR')}")
    peers = env.get("VOW_PEERS", "")
    entries = [p.strip() for p in peers.split(",") if p.strip()]
    ids = []
    for entry in entries:
        m = re.fullmatch(r"(\d+)=([^@]+)", entry)
        if check(m is not None, f"VOW_PEERS entry {entry!r} is id=host:port (peer port by default)"):
            i = int(m.group(1))
            ids.append(i)
            check(m.group(2) == host.format(i=i),
                  f"VOW_PEERS entry {i} is {host.format(i=i)} (the pod's name in namespace {ns}), is {m.group(2)}")
    check(len(ids) >= 1 and len(set(ids)) == len(ids), f"VOW_PEERS lists distinct voters, lists {ids}")
    check(all(start <= i < start + replicas for i in ids),
          f"every initial voter {ids} is a pod of the {replicas} replicas from ordinal {start}")
    check(len(ids) % 2 == 1, f"an odd number of initial voters ({len(ids)})")
    check(1 <= int(env.get("VOW_SHARDS", "8")) <= 256, "VOW_SHARDS between 1 and 256")

    # Volumes and mounts.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for m in mounts.values():
        check(m["name"] in volumes or m["name"] in claims, f"volumeMount {m['name']} has a volume")
        if "secret" in volumes.get(m["name"], {}):
            check("subPath" not in m, f"secret volume {m['name']} is mounted as a directory (subPath misses updates)")
    data_dir = env.get("VOW_DATA_DIR", "/var/lib/vow")
    check(data_dir in mounts and mounts[data_dir]["name"] in claims, f"VOW_DATA_DIR {data_dir} is a volume claim")
    for t in claims.values():
        check(t["spec"].get("accessModes") == ["ReadWriteOnce"], f"volume claim {t['metadata']['name']} ReadWriteOnce")

    def file_from_secret(var):
        """The file a VOW_*_FILE-like variable names comes from a mounted Secret key."""
        path = env.get(var)
        for mp, m in mounts.items():
            if path and path.startswith(mp.rstrip("/") + "/"):
                secret = volumes.get(m["name"], {}).get("secret")
                if secret is None:
                    return check(False, f"{var}={path} is on a Secret volume")
                rel = path[len(mp.rstrip("/")) + 1:]
                items = secret.get("items")
                return check(items is None or any(i["path"] == rel for i in items),
                             f"{var}={path}: Secret {secret['secretName']} provides {rel}")
        return check(False, f"{var}={path} is on a mounted volume")

    tls_vars = [v for v in ("VOW_TLS_CERT", "VOW_TLS_KEY", "VOW_TLS_CA") if v in env]
    check(len(tls_vars) in (0, 3), f"VOW_TLS_CERT, _KEY and _CA together or none (set: {tls_vars})")
    tls = len(tls_vars) == 3
    for var in tls_vars + [v for v in ("VOW_AUTH_FILE", "VOW_COMPLETION_KEYS_FILE", "VOW_TLS_CLIENT_CA") if v in env]:
        file_from_secret(var)
    scheme = "HTTPS" if tls else "HTTP"
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet")
        if check(get is not None, f"{probe} is an httpGet"):
            check(get.get("path") == path, f"{probe} path is {path}")
            check(get.get("port") in ("http", ports.get("http")), f"{probe} uses the http port")
            check(get.get("scheme", "HTTP") == scheme, f"{probe} scheme is {scheme} (TLS {'on' if tls else 'off'})")
    ann = tmpl["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/port") == str(ports.get("http")) and ann.get("prometheus.io/path") == "/metrics",
          "prometheus.io annotations name the http port and /metrics")
    check(ann.get("prometheus.io/scheme", "http") == scheme.lower(), f"prometheus.io/scheme is {scheme.lower()}")

    # Services.
    services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
    for s in services.values():
        sname = s["metadata"]["name"]
        check(matches(s["spec"].get("selector", {}), pod_labels), f"Service {sname} selects the pods")
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            check(target in ports or target in ports.values(), f"Service {sname} port {p['name']} targets a container port")
    headless = services.get(svc_name, {}).get("spec", {})
    check(headless.get("clusterIP") == "None", f"serviceName {svc_name} is a headless Service")
    check(headless.get("publishNotReadyAddresses") is True, f"{svc_name} publishes pods before they are ready")
    check({p["name"] for p in headless.get("ports", [])} >= {"grpc", "peer"}, f"{svc_name} has the grpc and peer ports")
    client = services.get(name, {}).get("spec", {})
    check(client.get("type", "ClusterIP") == "ClusterIP" and client.get("clusterIP") != "None"
          and not client.get("publishNotReadyAddresses"), f"client Service {name}: ClusterIP, ready pods only")
    check({p["name"] for p in client.get("ports", [])} == {"grpc", "http"}, f"client Service {name} has grpc and http")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        check(matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), "the PodDisruptionBudget selects the pods")
        check(pdb["spec"].get("maxUnavailable") == 1, "the PodDisruptionBudget allows one pod down")
    check(len(by_kind.get("PodDisruptionBudget", [])) == 1, "one PodDisruptionBudget")

    # The peer port is open to vow's pods only.
    nps = by_kind.get("NetworkPolicy", [])
    check(len(nps) >= 1, "a NetworkPolicy")
    for np in nps:
        if not matches(np["spec"]["podSelector"].get("matchLabels", {}), pod_labels):
            continue
        for rule in np["spec"].get("ingress", []):
            rule_ports = {p.get("port") for p in rule.get("ports", [])}
            if rule_ports & {ports.get("peer"), "peer"} or not rule_ports:
                srcs = rule.get("from", [])
                check(bool(srcs) and all(set(s) == {"podSelector"} and matches(s["podSelector"].get("matchLabels", {}), pod_labels)
                                         for s in srcs),
                      f"NetworkPolicy {np['metadata']['name']}: the peer port only from the StatefulSet's pods")
            else:
                check(rule_ports <= {ports.get("grpc"), ports.get("http"), "grpc", "http"},
                      f"NetworkPolicy {np['metadata']['name']}: open rule covers grpc/http only")
    return services, pod_labels


def check_service_monitor(sm, services):
    check(sm.get("apiVersion") == "monitoring.coreos.com/v1" and sm.get("kind") == "ServiceMonitor",
          "ServiceMonitor is monitoring.coreos.com/v1")
    sel = sm["spec"]["selector"]["matchLabels"]
    ns = sm["metadata"].get("namespace")
    check(ns in sm["spec"].get("namespaceSelector", {}).get("matchNames", [ns]), "ServiceMonitor looks in its namespace")
    hits = [s for s in services.values()
            if s["metadata"].get("namespace") == ns and matches(sel, s["metadata"].get("labels", {}))]
    check(bool(hits), "ServiceMonitor selects a Service of the base")
    for ep in sm["spec"]["endpoints"]:
        with_port = [s["metadata"]["name"] for s in hits if ep["port"] in {p["name"] for p in s["spec"]["ports"]}]
        check(with_port == ["vow"], f"ServiceMonitor port {ep['port']} is the client Service's only, is on {with_port}")
        check(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor scrapes /metrics")


def main(argv):
    sm_path = None
    if len(argv) >= 2 and argv[0] == "--service-monitor":
        sm_path, argv = argv[1], argv[2:]
    if len(argv) != 1:
        sys.exit(__doc__)
    with open(argv[0]) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    result = check_rendering(docs)
    if sm_path and result:
        with open(sm_path) as f:
            sms = [d for d in yaml.safe_load_all(f) if d]
        check(len(sms) == 1, "one ServiceMonitor in its file")
        check_service_monitor(sms[0], result[0])
    for f in failures:
        print(f"  FAIL {f}")
    print(f"  {passed} checks passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
