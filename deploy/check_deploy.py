#!/usr/bin/python3
"""Checks deploy/ (run by ctest as DeployCheck; Debian packages only).

    /usr/bin/python3 deploy/check_deploy.py [--lossguardd build/bin/lossguardd
                                             --lossguard build/bin/lossguard]

1. Kubernetes manifests (deploy/k8s/*.yaml): every object is checked against
   the Kubernetes API schema as Debian's python3-kubernetes (the official
   client, generated from the API's OpenAPI spec) models it: every field
   known, of the right type, required fields present. Then the objects
   against each other: Services select the Deployments' pods and name their
   ports, env vars used in args are defined, Secret keys exist, the
   kustomization lists every file.
2. Envoy's configuration (in its ConfigMap): ring hash on the header the
   lossguard clients send, gRPC health checks of the service the daemon
   serves, upstreams at the daemons' headless Service.
3. The systemd unit: `systemd-analyze verify` (with ExecStart pointed at
   the built daemon), which must print nothing.
4. The container recipe: its runtime stage installs the Debian package of
   every shared library the built lossguardd and lossguard load.

Exit 0 when all hold; otherwise each problem on stderr and exit 1.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import yaml
from kubernetes.client import models as k8s

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN_ID_HEADER = "lossguard-run-id"
SERVICE_NAME = "lossguard.v1.LossGuard"
# In debian:12-slim already (apt and dpkg depend on them).
BASE_IMAGE_PACKAGES = {"libc6", "libstdc++6", "libgcc-s1", "zlib1g"}

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


# ------------------------------------------------------------ API schema
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float),
              "object": object, "datetime": str, "date": str}


def model_of(api_version, kind):
    """V1Deployment for apps/v1 Deployment, V1Service for v1 Service, ..."""
    version = api_version.split("/")[-1]
    name = version[0].upper() + version[1:] + kind
    return getattr(k8s, name, None)


def check_value(value, type_name, where):
    if type_name in PRIMITIVES:
        want = PRIMITIVES[type_name]
        # YAML's bool is an int in Python: keep them apart.
        if type_name == "int" and isinstance(value, bool):
            problem(where, f"expected int, got {value!r}")
        elif not isinstance(value, want):
            problem(where, f"expected {type_name}, got {type(value).__name__} {value!r}")
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            problem(where, f"expected a list of {m.group(1)}")
            return
        for i, item in enumerate(value):
            check_value(item, m.group(1), f"{where}[{i}]")
        return
    m = re.fullmatch(r"dict\((.+), (.+)\)", type_name)
    if m:
        if not isinstance(value, dict):
            problem(where, f"expected a map of {m.group(2)}")
            return
        for k, v in value.items():
            check_value(v, m.group(2), f"{where}.{k}")
        return
    cls = getattr(k8s, type_name, None)
    if cls is None:
        problem(where, f"unknown type {type_name}")
        return
    check_object(value, cls, where)


def check_object(value, cls, where):
    if not isinstance(value, dict):
        problem(where, f"expected an object ({cls.__name__})")
        return
    by_json = {json: attr for attr, json in cls.attribute_map.items()}
    for key, v in value.items():
        if key not in by_json:
            problem(where, f"unknown field {key!r} in {cls.__name__}")
            continue
        if v is not None:
            check_value(v, cls.openapi_types[by_json[key]], f"{where}.{key}")
    # Required fields: the generated constructor refuses None for them.
    kwargs = {by_json[k]: v for k, v in value.items() if k in by_json}
    try:
        cls(**kwargs)
    except ValueError as e:
        problem(where, f"{cls.__name__}: {e}")
    except TypeError:
        pass  # nested dicts where models are expected: checked above


def load_manifests():
    docs = []
    for path in sorted(glob.glob(os.path.join(HERE, "k8s", "*.yaml"))):
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    docs.append((f"{os.path.relpath(path, ROOT)}#{i}", doc))
    return docs


def check_manifests(docs):
    objects = []
    for where, doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion", "")
        if kind == "Kustomization":
            for res in doc.get("resources", []):
                if not os.path.exists(os.path.join(HERE, "k8s", res)):
                    problem(where, f"resource {res} does not exist")
            listed = set(doc.get("resources", []))
            for path in glob.glob(os.path.join(HERE, "k8s", "*.yaml")):
                name = os.path.basename(path)
                if name != "kustomization.yaml" and name not in listed:
                    problem(where, f"{name} is not listed in resources")
            continue
        cls = model_of(api, kind) if kind else None
        if cls is None:
            problem(where, f"unknown kind {api} {kind}")
            continue
        check_object(doc, cls, f"{where} ({kind} {doc.get('metadata', {}).get('name')})")
        objects.append((where, doc))
    return objects


def check_consistency(objects):
    by_kind = {}
    for where, doc in objects:
        by_kind.setdefault(doc["kind"], []).append((where, doc))
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for _, d in by_kind.get("Secret", [])}
    config_maps = {d["metadata"]["name"] for _, d in by_kind.get("ConfigMap", [])}
    pods = []  # (labels, container ports by name)
    for where, dep in by_kind.get("Deployment", []):
        spec = dep["spec"]
        template_labels = spec["template"]["metadata"].get("labels", {})
        for k, v in spec["selector"].get("matchLabels", {}).items():
            if template_labels.get(k) != v:
                problem(where, f"selector {k}={v} does not match the pod template")
        ports = {}
        for c in spec["template"]["spec"]["containers"]:
            for p in c.get("ports", []):
                if "name" in p:
                    ports[p["name"]] = p["containerPort"]
            env = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []) + c.get("command", []):
                for ref in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", arg):
                    if ref not in env:
                        problem(where, f"{c['name']}: $({ref}) in args is not an env var")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secrets.get(ref["name"], set()):
                    problem(where, f"{c['name']}: secret {ref['name']} has no key {ref['key']}")
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    problem(where, f"{c['name']}: no {probe}")
        for v in spec["template"]["spec"].get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] not in config_maps:
                problem(where, f"volume {v['name']}: no ConfigMap {v['configMap']['name']}")
        pods.append((template_labels, ports))
    for where, svc in by_kind.get("Service", []):
        selector = svc["spec"].get("selector", {})
        matched = [ports for labels, ports in pods
                   if all(labels.get(k) == v for k, v in selector.items())]
        if not matched:
            problem(where, f"Service {svc['metadata']['name']} selects no pods")
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            if isinstance(target, str) and not all(target in m for m in matched):
                problem(where, f"targetPort {target} is not a port of the selected pods")
    daemon = [d for _, d in by_kind.get("Deployment", [])
              if any("lossguardd" in c.get("name", "") for c in
                     d["spec"]["template"]["spec"]["containers"])]
    if not daemon:
        problem("deploy/k8s", "no Deployment runs lossguardd")
    for d in daemon:
        c = d["spec"]["template"]["spec"]["containers"][0]
        args = " ".join(c.get("args", []))
        for flag in ("--db=", "--advertise=", "--replica_id="):
            if flag not in args:
                problem("deploy/k8s/deployment.yaml", f"lossguardd without {flag}")
        for probe in ("livenessProbe", "readinessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command", [])
            if "probe" not in cmd:
                problem("deploy/k8s/deployment.yaml",
                        f"{probe} does not ask the gRPC health service (lossguard probe)")
    return by_kind


# ------------------------------------------------------------ Envoy
def check_envoy(by_kind):
    headless = {s["metadata"]["name"]: s for _, s in by_kind.get("Service", [])
                if s["spec"].get("clusterIP") == "None"}
    for _, cm in by_kind.get("ConfigMap", []):
        text = cm.get("data", {}).get("envoy.yaml")
        if text is None:
            continue
        where = f"ConfigMap {cm['metadata']['name']} envoy.yaml"
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem(where, f"not YAML: {e}")
            continue
        clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
        hashed = False
        for listener in cfg["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for f in chain["filters"]:
                    hcm = f["typed_config"]
                    for vh in hcm["route_config"]["virtual_hosts"]:
                        for r in vh["routes"]:
                            cluster = r["route"]["cluster"]
                            if cluster not in clusters:
                                problem(where, f"route to unknown cluster {cluster}")
                            for h in r["route"].get("hash_policy", []):
                                name = h.get("header", {}).get("header_name")
                                if name != RUN_ID_HEADER:
                                    problem(where, f"hash on {name}, not {RUN_ID_HEADER}")
                                if clusters.get(cluster, {}).get("lb_policy") != "RING_HASH":
                                    problem(where, f"{cluster}: hash policy without RING_HASH")
                                hashed = True
        if not hashed:
            problem(where, f"no route hashes on {RUN_ID_HEADER}")
        for c in clusters.values():
            for hc in c.get("health_checks", []):
                svc = hc.get("grpc_health_check", {}).get("service_name")
                if svc is not None and svc != SERVICE_NAME:
                    problem(where, f"{c['name']}: health check of {svc}, not {SERVICE_NAME}")
            for ep in c["load_assignment"]["endpoints"]:
                for lb in ep["lb_endpoints"]:
                    addr = lb["endpoint"]["address"]["socket_address"]
                    svc = headless.get(addr["address"])
                    if svc is None:
                        problem(where, f"{c['name']}: {addr['address']} is not a headless Service")
                    elif addr["port_value"] not in [p["port"] for p in svc["spec"]["ports"]]:
                        problem(where, f"{c['name']}: port {addr['port_value']} not served")
    # The clients send the header Envoy hashes on.
    for src in ("client/core/src/client.cc", "client/python/lossguard/client.py"):
        with open(os.path.join(ROOT, src)) as f:
            if f'"{RUN_ID_HEADER}"' not in f.read():
                problem(src, f"does not send {RUN_ID_HEADER}")
    with open(os.path.join(ROOT, "server/service/src/service.cc")) as f:
        if f'"{SERVICE_NAME}"' not in f.read():
            problem("server/service/src/service.cc", f"does not serve health for {SERVICE_NAME}")


# ------------------------------------------------------------ systemd
def check_systemd(lossguardd):
    unit = os.path.join(HERE, "systemd", "lossguardd.service")
    if subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode:
        problem(unit, "systemd-analyze not found (deploy/install-deps.sh installs systemd)")
        return
    with open(unit) as f:
        text = f.read()
    if lossguardd:
        text = text.replace("/usr/local/bin/lossguardd", os.path.abspath(lossguardd))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "lossguardd.service")
        with open(path, "w") as f:
            f.write(text)
        r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        # Without the built binary ExecStart cannot be resolved: only that
        # complaint is expected then.
        lines = [l for l in out.splitlines()
                 if lossguardd or "lossguardd" not in l or "not executable" not in l]
        if lines or (r.returncode != 0 and lossguardd):
            problem(unit, "systemd-analyze verify: " + "; ".join(lines or [out]))
    for key in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                "CapabilityBoundingSet=", "SystemCallFilter=@system-service",
                "RestrictAddressFamilies="):
        if key not in text:
            problem(unit, f"hardening option {key} missing")


# ------------------------------------------------------------ container
def check_container(binaries):
    path = os.path.join(HERE, "container", "Containerfile")
    with open(path) as f:
        text = f.read()
    stages = re.split(r"^FROM ", text, flags=re.M)
    runtime = stages[-1]
    for binary in binaries:
        if not binary:
            continue
        # The libraries it names itself (apt brings theirs along).
        needed = set(re.findall(r"NEEDED\s+(\S+)", subprocess.run(
            ["objdump", "-p", binary], capture_output=True, text=True).stdout))
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for name, lib in re.findall(r"^\s*(\S+) => (\S+)", out, flags=re.M):
            if name not in needed:
                continue
            real = os.path.realpath(lib)
            owner = None
            for candidate in (real, lib, "/usr" + lib if not lib.startswith("/usr") else lib):
                r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
                if r.returncode == 0:
                    owner = r.stdout.split(":")[0]
                    break
            if owner is None:
                problem(path, f"{binary} loads {lib}, which no Debian package owns")
                continue
            if owner in BASE_IMAGE_PACKAGES:
                continue
            if not re.search(rf"(^|\s){re.escape(owner)}(\s|\\|$)", runtime, flags=re.M):
                problem(path, f"runtime stage lacks {owner} ({os.path.basename(lib)}, "
                              f"loaded by {os.path.basename(binary)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lossguardd", help="the built daemon (systemd and container checks)")
    ap.add_argument("--lossguard", help="the built CLI (container check)")
    args = ap.parse_args()
    objects = check_manifests(load_manifests())
    try:
        check_envoy(check_consistency(objects))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        # A field the schema check already reported missing or mistyped.
        problem("deploy/k8s", f"cannot cross-check the objects: {e!r}")
    check_systemd(args.lossguardd)
    check_container([args.lossguardd, args.lossguard])
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"check_deploy: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_deploy: {len(objects)} Kubernetes objects, Envoy, systemd unit "
          f"and container recipe OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
