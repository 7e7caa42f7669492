#!/usr/bin/env python3
"""Assertions on a rendered overlay (`kubectl kustomize deploy/k8s/overlays/NAME`), and the
extraction of what deploy/check.sh runs under podman from it.

  check.py RENDERED.yaml OVERLAY              assert what docs/deploy.md promises
  check.py RENDERED.yaml OVERLAY --extract DIR
      also write DIR/{relay,connector}.toml (the ConfigMaps' files) and DIR/{relay,connector}.sh
      (podman run arguments from the Deployments: args, env, user, read-only root, capabilities,
      pod sysctls)
"""

import shlex
import sys
from pathlib import Path

import yaml

rendered, overlay = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
errors = []


def check(cond, what):
    if not cond:
        errors.append(what)


def get(kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    errors.append(f"no {kind} {name}")
    return {}


def by_prefix(kind, prefix):
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]


check(all(d["metadata"].get("namespace", "ztna") == "ztna" for d in docs if d["kind"] != "Namespace"),
      "every object is in namespace ztna")
for name in ("ztna-relay", "ztna-connector"):
    dep = get("Deployment", name)
    spec = dep.get("spec", {}).get("template", {}).get("spec", {})
    c = (spec.get("containers") or [{}])[0]
    check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{name}: readiness on /readyz")
    check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", f"{name}: liveness on /healthz")
    sc = c.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, f"{name}: read-only root filesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: drops ALL capabilities")
    res = c.get("resources", {})
    check({"cpu", "memory"} <= set(res.get("requests", {})) and {"cpu", "memory"} <= set(res.get("limits", {})),
          f"{name}: requests and limits")
    check(spec.get("automountServiceAccountToken") is False, f"{name}: no service account token")

relay = get("Deployment", "ztna-relay")["spec"]["template"]["spec"]
check(relay["securityContext"].get("runAsNonRoot") is True, "relay: non-root")
check(not relay["containers"][0]["securityContext"]["capabilities"].get("add"), "relay: no capability added")
svc = get("Service", "ztna-relay")["spec"]
check(svc.get("type") == "LoadBalancer", "relay Service: LoadBalancer")
check(svc.get("externalTrafficPolicy") == "Local", "relay Service: externalTrafficPolicy Local (observed addresses)")
check([(p["port"], p["protocol"]) for p in svc["ports"]] == [(4433, "UDP"), (4435, "UDP")], "relay Service: UDP 4433 and 4435 only")
check(get("Service", "ztna-relay-metrics").get("spec", {}).get("ports", [{}])[0].get("port") == 9090, "metrics Service on 9090")
check(get("PodDisruptionBudget", "ztna-relay").get("spec", {}).get("minAvailable") == 1, "relay PodDisruptionBudget")
check(len(by_prefix("ConfigMap", "ztna-relay-config")) == 1 and len(by_prefix("ConfigMap", "ztna-connector-config")) == 1,
      "one ConfigMap per daemon")
pki = {d["metadata"]["name"].rsplit("-", 1)[0]: set(d["data"]) for d in by_prefix("Secret", "ztna-")}
check(pki.get("ztna-relay-pki") == {"ca.pem", "relay.pem", "relay.key"}, f"relay PKI Secret: {pki}")
check(pki.get("ztna-connector-pki") == {"ca.pem", "connector.pem", "connector.key"}, f"connector PKI Secret: {pki}")

conn = get("Deployment", "ztna-connector")["spec"]["template"]["spec"]
cc = conn["containers"][0]
env = {e["name"]: e.get("value") for e in cc.get("env", [])}
check("ZTNA_RELAY" in env, "connector: the overlay sets ZTNA_RELAY")
annotations = get("Service", "ztna-relay")["metadata"].get("annotations", {})
if overlay == "home":
    check("metallb.universe.tf/loadBalancerIPs" in annotations, "home: MetalLB address")
    check(not conn.get("hostNetwork"), "home: connector in the pod network")
    check(not cc["securityContext"]["capabilities"].get("add"), "home: connector without capabilities")
elif overlay == "aws":
    a = "service.beta.kubernetes.io/aws-load-balancer-"
    check(annotations.get(a + "type") == "external" and annotations.get(a + "nlb-target-type") == "ip", "aws: NLB with IP targets")
    check(annotations.get(a + "healthcheck-path") == "/readyz", "aws: NLB health check on /readyz")
    check("preserve_client_ip.enabled=true" in annotations.get(a + "target-group-attributes", ""), "aws: client IP preserved")
    check(conn.get("hostNetwork") is True, "aws: connector on the host network (XDP on the node's NIC)")
    check(set(cc["securityContext"]["capabilities"].get("add", [])) == {"BPF", "NET_ADMIN", "NET_RAW", "IPC_LOCK"},
          "aws: exactly the XDP capabilities")
    check(env.get("ZTNA_XDP") == "native", "aws: native XDP")
    check("sysctls" not in conn.get("securityContext", {}), "aws: no pod sysctls with hostNetwork")
else:
    errors.append(f"unknown overlay {overlay}")

if len(sys.argv) > 4 and sys.argv[3] == "--extract":
    out = Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    for daemon in ("relay", "connector"):
        cm = by_prefix("ConfigMap", f"ztna-{daemon}-config")[0]
        (out / f"{daemon}.toml").write_text(cm["data"][f"{daemon}.toml"])
        spec = get("Deployment", f"ztna-{daemon}")["spec"]["template"]["spec"]
        c = spec["containers"][0]
        user = spec.get("securityContext", {}).get("runAsUser", 0)
        group = spec.get("securityContext", {}).get("runAsGroup", user)
        args = [f"--user={user}:{group}"]
        if c["securityContext"].get("readOnlyRootFilesystem"):
            args.append("--read-only")
        args += ["--cap-drop=all"] + [f"--cap-add={x}" for x in c["securityContext"]["capabilities"].get("add", [])]
        if c["securityContext"].get("allowPrivilegeEscalation") is False:
            args.append("--security-opt=no-new-privileges")
        for sc in spec.get("securityContext", {}).get("sysctls") or []:
            args.append(f"--sysctl={sc['name']}={sc['value']}")
        for e in c.get("env", []):
            args.append(f"--env={e['name']}={e['value']}")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        lines = [
            f"# podman run arguments of deployment ztna-{daemon} ({overlay} overlay), from {rendered}",
            f"POD_ARGS=({' '.join(shlex.quote(a) for a in args)})",
            f"POD_CONFIG_DIR={shlex.quote(mounts['config'])}",
            f"POD_PKI_DIR={shlex.quote(mounts['pki'])}",
            f"POD_CMD=({' '.join(shlex.quote(a) for a in c.get('args', []))})",
            f"POD_USER={user}",
        ]
        (out / f"{daemon}.sh").write_text("\n".join(lines) + "\n")

if errors:
    for e in errors:
        print(f"deploy/k8s ({overlay}): {e}", file=sys.stderr)
    sys.exit(1)
print(f"deploy/k8s ({overlay}): {len(docs)} objects: all assertions hold")
