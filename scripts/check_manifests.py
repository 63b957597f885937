#!/usr/bin/env python3
"""Offline checks of what kvmesh ships for deployment (run by scripts/check-manifests.sh).

- deploy/kubernetes: every kustomization is rendered (resources, configMapGenerator, images,
  namespace: the subset of kustomize these manifests use) and every object is validated against
  the Kubernetes JSON schemas bundled with `kubernetes-validate`, strictly (unknown fields fail).
  Every other YAML file under deploy/ is validated on its own, so none escapes the check.
  Pod specs must reference ConfigMaps that the kustomization makes, and Secrets from the list
  the operator is told to create. Generated node.toml files must parse as TOML (the Rust test
  node/tests/config_reference.rs checks them against the Config type).
- Where kubectl is installed, `kubectl kustomize` must render the same objects.
- examples/compose/docker-compose.yml is validated against the compose-spec schema (by the
  shell script, with check-jsonschema).
"""
import os
import shutil
import subprocess
import sys
import tomllib

import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "kvmesh-alerts.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "kvmesh-dashboard.json")
SCALER = os.path.join(ROOT, "deploy", "keda", "kvmesh-scaledobject.yaml")


def check_monitoring():
    """The alert rules are Prometheus rule groups and the dashboard is Grafana JSON, each with
    what Prometheus and Grafana require (their metric names are checked against a live node by
    node/tests/metrics_families.rs)."""
    import json

    with open(SCALER) as f:
        so = yaml.safe_load(f)
    if so.get("apiVersion") != "keda.sh/v1alpha1" or so.get("kind") != "ScaledObject":
        fail(f"{SCALER}: not a KEDA ScaledObject")
    target = so["spec"]["scaleTargetRef"]
    if target.get("kind") != "StatefulSet" or target.get("name") != "kvmesh":
        fail(f"{SCALER}: must scale the StatefulSet `kvmesh` of deploy/kubernetes/vllm")
    for t in so["spec"]["triggers"]:
        if t.get("type") != "prometheus" or not t["metadata"].get("query") or not t["metadata"].get("threshold"):
            fail(f"{SCALER}: a trigger needs type prometheus, a query and a threshold")
        float(t["metadata"]["threshold"])

    with open(ALERTS) as f:
        rules = yaml.safe_load(f)
    for g in rules.get("groups", []):
        if not g.get("name") or not g.get("rules"):
            fail(f"{ALERTS}: a group needs a name and rules")
        for r in g["rules"]:
            if not r.get("alert") or not r.get("expr") or not isinstance(r.get("expr"), str):
                fail(f"{ALERTS}: rule {r!r} needs `alert` and `expr`")
            if r.get("expr", "").count("(") != r.get("expr", "").count(")"):
                fail(f"{ALERTS}: unbalanced parentheses in {r.get('alert')}")
    if not rules.get("groups"):
        fail(f"{ALERTS}: no rule groups")
    with open(DASHBOARD) as f:
        dash = json.load(f)
    for p in dash.get("panels", []):
        if not p.get("title") or not p.get("targets") or not p.get("gridPos"):
            fail(f"{DASHBOARD}: panel {p.get('id')} needs a title, targets and gridPos")
        for t in p.get("targets", []):
            if t.get("expr", "").count("(") != t.get("expr", "").count(")"):
                fail(f"{DASHBOARD}: unbalanced parentheses in panel {p.get('title')}")
    print(f"monitoring: {sum(len(g['rules']) for g in rules['groups'])} alert rules, {len(dash['panels'])} dashboard panels: ok")
K8S_VERSION = os.environ.get("KVMESH_K8S_VERSION", "1.30.0")
# Secrets the operator creates (deploy/kubernetes/README.md); `optional` ones may be missing.
OPERATOR_SECRETS = {"kvmesh-certs", "hf-token"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def render(kdir, seen=()):
    """The objects `kubectl kustomize kdir` would print, for the features used here."""
    kpath = os.path.join(kdir, "kustomization.yaml")
    if kdir in seen:
        raise ValueError(f"{kpath}: resource cycle")
    (k,) = load_docs(kpath)
    if k.get("kind") != "Kustomization":
        raise ValueError(f"{kpath}: kind is not Kustomization")
    known = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "images", "namespace"}
    unknown = set(k) - known
    if unknown:
        raise ValueError(f"{kpath}: keys this checker does not render: {sorted(unknown)}")
    objs = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        if os.path.isdir(p):
            objs += render(p, seen + (kdir,))
        elif os.path.isfile(p):
            if not p.startswith(kdir + os.sep):
                raise ValueError(f"{kpath}: file {r} is outside the kustomization root (kustomize refuses it)")
            objs += load_docs(p)
        else:
            raise ValueError(f"{kpath}: resource {r} does not exist")
    suffix_hash = not k.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    if suffix_hash and k.get("configMapGenerator"):
        raise ValueError(f"{kpath}: name suffix hashes are not rendered here; set disableNameSuffixHash")
    for g in k.get("configMapGenerator", []):
        data = {}
        for spec in g.get("files", []):
            key, _, rel = spec.rpartition("=") if "=" in spec else (os.path.basename(spec), "", spec)
            p = os.path.join(kdir, rel)
            with open(p) as f:
                data[key] = f.read()
            if key.endswith(".toml"):
                try:
                    tomllib.loads(data[key])
                except tomllib.TOMLDecodeError as e:
                    fail(f"{p}: not TOML: {e}")
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    for img in k.get("images", []):
        for o in objs:
            for c in containers(o):
                name, _, tag = c.get("image", "").partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag or 'latest')}"
    if "namespace" in k:
        for o in objs:
            o.setdefault("metadata", {})["namespace"] = k["namespace"]
    return objs


def pod_spec(o):
    kind = o.get("kind")
    if kind == "Pod":
        return o.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return o.get("spec", {}).get("template", {}).get("spec", {})
    if kind == "CronJob":
        return o.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    return None


def containers(o):
    spec = pod_spec(o) or {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def validate(o, where):
    try:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        fail(f"{where}: {o.get('kind')}/{o.get('metadata', {}).get('name')}: {e.message} (at {path})")
    except kubernetes_validate.SchemaNotFoundError as e:
        fail(f"{where}: no schema for {o.get('apiVersion')} {o.get('kind')}: {e}")


def check_references(objs, where):
    configmaps = {o["metadata"]["name"] for o in objs if o.get("kind") == "ConfigMap"}
    secrets = {o["metadata"]["name"] for o in objs if o.get("kind") == "Secret"} | OPERATOR_SECRETS
    accounts = {o["metadata"]["name"] for o in objs if o.get("kind") == "ServiceAccount"} | {"default"}
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        name = f"{o['kind']}/{o['metadata']['name']}"
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for v in vols.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                fail(f"{where}: {name} mounts ConfigMap {v['configMap']['name']}, which is not made here")
            if "secret" in v and v["secret"]["secretName"] not in secrets:
                fail(f"{where}: {name} mounts Secret {v['secret']['secretName']}, which nobody makes")
        if spec.get("serviceAccountName", "default") not in accounts:
            fail(f"{where}: {name} uses ServiceAccount {spec['serviceAccountName']}, which is not made here")
        for c in containers(o):
            cmd = c.get("command", [])
            if len(cmd) == 2 and cmd[0] in ("/bin/sh", "sh", "/bin/bash", "bash") and cmd[1].endswith("c"):
                script = "\n".join(c.get("args", []))
                r = subprocess.run([cmd[0], "-n", "-c", script], capture_output=True, text=True)
                if r.returncode != 0:
                    fail(f"{where}: {name} container {c['name']}: shell syntax: {r.stderr.strip()}")
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols:
                    fail(f"{where}: {name} container {c['name']} mounts undeclared volume {m['name']}")
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    fail(f"{where}: {name} container {c['name']} {probe} uses unknown port {port}")
        labels = o.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        for svc in (s for s in objs if s.get("kind") == "Service"):
            sel = svc["spec"].get("selector", {})
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                for p in svc["spec"].get("ports", []):
                    tp = p.get("targetPort")
                    named = {(q.get("name"), q.get("protocol", "TCP")) for c in spec.get("containers", []) for q in c.get("ports", [])}
                    if isinstance(tp, str) and (tp, p.get("protocol", "TCP")) not in named:
                        fail(f"{where}: Service {svc['metadata']['name']} targets port {tp}/{p.get('protocol', 'TCP')}, not on {name}")


def compare_with_kubectl(kdir, objs, where):
    """Where kubectl is installed, its kustomize must render exactly what was checked here."""
    if not shutil.which("kubectl"):
        return
    r = subprocess.run(["kubectl", "kustomize", kdir], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{where}: kubectl kustomize: {r.stderr.strip()}")
        return
    key = lambda o: (o["kind"], o["metadata"]["name"])
    theirs = {key(o): o for o in yaml.safe_load_all(r.stdout) if o}
    ours = {key(o): o for o in objs}
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        fail(f"{where}: kubectl kustomize renders differently: {diff}")


def main():
    check_monitoring()
    kdirs, files = [], []
    for d, _, names in os.walk(DEPLOY):
        for n in sorted(names):
            if n == "kustomization.yaml":
                kdirs.append(d)
            elif n.endswith((".yaml", ".yml")):
                files.append(os.path.join(d, n))
    for p in sorted(files):
        for o in load_docs(p):
            validate(o, os.path.relpath(p, ROOT))
    for d in sorted(kdirs):
        rel = os.path.relpath(d, ROOT)
        before = len(failures)
        try:
            objs = render(d)
        except (ValueError, OSError, KeyError) as e:
            fail(f"{rel}: {e}")
            continue
        for o in objs:
            validate(o, rel)
        check_references(objs, rel)
        compare_with_kubectl(d, objs, rel)
        if len(failures) == before:
                print(f"ok   {rel}: {len(objs)} objects ({', '.join(sorted(o['kind'] + '/' + o['metadata']['name'] for o in objs))})")
    print(f"{len(files)} manifest files, {len(kdirs)} kustomizations, Kubernetes {K8S_VERSION} schemas (strict)")
    if failures:
        print(f"{len(failures)} problem(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
