#!/usr/bin/env python3
"""Assertions on a rendered overlay (`kubectl kustomize deploy/k8s/overlays/NAME`), and the
extraction of what deploy/check.sh runs under podman from it.

  check.py RENDERED.yaml OVERLAY              assert what docs/deploy.md promises
  check.py RENDERED.yaml OVERLAY --extract DIR
      also write DIR/{relay,connector}.toml (the ConfigMaps' files) and DIR/{relay,connector}.sh
      (podman run arguments from the StatefulSet and the Deployment: args, env, user, read-only
      root, capabilities, pod sysctls; for the connector also the DNS names in its `relays`,
      which deploy/check.sh points at the relay container as cluster DNS would at the pods)
"""

import ipaddress
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

rendered, overlay = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
errors = []
NAMESPACE = "ztna"


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


def ports(svc):
    return [(p.get("port"), p.get("protocol")) for p in svc.get("spec", {}).get("ports", [])]


def host_of(entry):
    """The host of a `relays` entry "host:port" (IPv6 in brackets)."""
    host = entry.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


check(all(d["metadata"].get("namespace", NAMESPACE) == NAMESPACE for d in docs if d["kind"] != "Namespace"),
      f"every object is in namespace {NAMESPACE}")
check(not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ztna-relay"],
      "the relay is a StatefulSet, not a Deployment")
workloads = {"ztna-relay": get("StatefulSet", "ztna-relay"), "ztna-connector": get("Deployment", "ztna-connector")}
for name, w in workloads.items():
    spec = w.get("spec", {}).get("template", {}).get("spec", {})
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

# The relay fleet: a StatefulSet of two or more, rolled one pod at a time, spread over nodes
# (preferred only: a small cluster still runs every relay).
sts = workloads["ztna-relay"].get("spec", {})
relay = sts.get("template", {}).get("spec", {})
replicas = sts.get("replicas", 1)
check(replicas >= 2, f"relay: a fleet of two or more replicas (has {replicas})")
check(sts.get("podManagementPolicy") == "Parallel", "relay: podManagementPolicy Parallel")
# A rolled relay comes back at a new pod IP, which in-cluster connectors learn when they next
# resolve the headless name (every 60 s, core::fleet::RESOLVE_INTERVAL) from an answer CoreDNS
# may have cached for up to 30 s: the next relay waits until they are back on it.
check(sts.get("minReadySeconds", 0) >= 90,
      f"relay: minReadySeconds of at least 90 (connectors re-resolve every 60 s; has {sts.get('minReadySeconds', 0)})")
check(sts.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
      and not sts.get("updateStrategy", {}).get("rollingUpdate", {}).get("partition"),
      "relay: RollingUpdate over every pod")
check(relay.get("securityContext", {}).get("runAsNonRoot") is True, "relay: non-root")
check(not (relay.get("containers") or [{}])[0].get("securityContext", {}).get("capabilities", {}).get("add"),
      "relay: no capability added")
check(not relay.get("hostNetwork"), "relay: in the pod network (hostNetwork is the documented alternative)")
anti = relay.get("affinity", {}).get("podAntiAffinity", {})
check(any(t.get("podAffinityTerm", {}).get("topologyKey") == "kubernetes.io/hostname"
          for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])),
      "relay: preferred anti-affinity per node")
check(not anti.get("requiredDuringSchedulingIgnoredDuringExecution")
      and all(t.get("whenUnsatisfiable") == "ScheduleAnyway" for t in relay.get("topologySpreadConstraints", [])),
      "relay: spreading is preferred, never required")
relay_labels = sts.get("template", {}).get("metadata", {}).get("labels", {})

# The headless Service: one DNS name for every ready relay pod (the connector's `relays`).
headless_name = sts.get("serviceName", "")
headless = get("Service", headless_name) if headless_name else {}
check(bool(headless_name), "relay: StatefulSet serviceName names the headless Service")
hs = headless.get("spec", {})
check(hs.get("clusterIP") == "None", f"relay Service {headless_name}: headless (clusterIP None)")
check(bool(hs.get("selector")) and hs.get("selector", {}).items() <= relay_labels.items(),
      f"relay Service {headless_name}: selects the relay pods")
check(not hs.get("publishNotReadyAddresses"), f"relay Service {headless_name}: only ready relays in DNS")
check((4433, "UDP") in ports(headless), f"relay Service {headless_name}: UDP 4433")
headless_dns = f"{headless_name}.{NAMESPACE}.svc.cluster.local"

# One public LoadBalancer Service per relay pod, and no shared one.
public = {}
for d in docs:
    if d["kind"] == "Service" and d.get("spec", {}).get("type") == "LoadBalancer":
        sel = d["spec"].get("selector", {})
        pod = sel.get("statefulset.kubernetes.io/pod-name")
        check(pod is not None and set(sel) == {"statefulset.kubernetes.io/pod-name"},
              f"LoadBalancer Service {d['metadata']['name']}: selects one relay pod by name, not several")
        if pod is not None:
            check(pod not in public, f"{pod}: one LoadBalancer Service only")
            public[pod] = d
want = {f"ztna-relay-{i}" for i in range(replicas)}
check(set(public) == want, f"one LoadBalancer Service per replica: {sorted(want)}, found {sorted(public)}")
for pod, d in sorted(public.items()):
    name = d["metadata"]["name"]
    check(d["spec"].get("externalTrafficPolicy") == "Local", f"{name}: externalTrafficPolicy Local (observed addresses)")
    check(ports(d) == [(4433, "UDP"), (4435, "UDP")], f"{name}: UDP 4433 and 4435 only")

check(ports(get("Service", "ztna-relay-metrics"))[:1] == [(9090, "TCP")], "metrics Service on 9090")
pdb = get("PodDisruptionBudget", "ztna-relay").get("spec", {})
check(pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb, "relay PodDisruptionBudget: maxUnavailable 1")
check(pdb.get("selector", {}).get("matchLabels", {}).items() <= relay_labels.items() and pdb.get("selector"),
      "relay PodDisruptionBudget selects the relay pods")
check(len(by_prefix("ConfigMap", "ztna-relay-config")) == 1 and len(by_prefix("ConfigMap", "ztna-connector-config")) == 1,
      "one ConfigMap per daemon")
pki = {d["metadata"]["name"].rsplit("-", 1)[0]: set(d["data"]) for d in by_prefix("Secret", "ztna-")}
check(pki.get("ztna-relay-pki") == {"ca.pem", "relay.pem", "relay.key"}, f"relay PKI Secret: {pki}")
check(pki.get("ztna-connector-pki") == {"ca.pem", "connector.pem", "connector.key"}, f"connector PKI Secret: {pki}")

# The connector attaches to every relay: the headless name in its config; overlays may replace
# the list (ZTNA_RELAYS) with one public address per relay, never the single-relay key.
conn_cfg = tomllib.loads(by_prefix("ConfigMap", "ztna-connector-config")[0]["data"]["connector.toml"])
check(conn_cfg.get("relays") == [f"{headless_dns}:4433"],
      f"connector config: relays = [\"{headless_dns}:4433\"] (has {conn_cfg.get('relays')})")
check("relay" not in conn_cfg, "connector config: `relays`, not the single `relay`")
conn = workloads["ztna-connector"].get("spec", {}).get("template", {}).get("spec", {})
cc = (conn.get("containers") or [{}])[0]
env = {e["name"]: e.get("value") for e in cc.get("env", [])}
check("ZTNA_RELAY" not in env, "connector: no ZTNA_RELAY (one relay); ZTNA_RELAYS lists the fleet")

if overlay == "home":
    ips = [d["metadata"].get("annotations", {}).get("metallb.universe.tf/loadBalancerIPs") for d in public.values()]
    check(all(ips) and len(set(ips)) == len(ips), f"home: a MetalLB address of its own for every relay: {ips}")
    check(all(d["metadata"].get("annotations", {}).get("lbipam.cilium.io/ips") == ip
              for d, ip in zip(public.values(), ips)), "home: the same address for Cilium LB IPAM")
    check("ZTNA_RELAYS" not in env, "home: the connector uses the headless Service (no ZTNA_RELAYS)")
    check(not conn.get("hostNetwork"), "home: connector in the pod network")
    check(not cc["securityContext"]["capabilities"].get("add"), "home: connector without capabilities")
elif overlay == "aws":
    a = "service.beta.kubernetes.io/aws-load-balancer-"
    eips = []
    for pod, d in sorted(public.items()):
        ann = d["metadata"].get("annotations", {})
        name = d["metadata"]["name"]
        check(d["spec"].get("loadBalancerClass") == "service.k8s.aws/nlb", f"aws {name}: AWS Load Balancer Controller NLB")
        check(ann.get(a + "type") == "external" and ann.get(a + "nlb-target-type") == "ip", f"aws {name}: NLB with IP targets")
        check(ann.get(a + "scheme") == "internet-facing", f"aws {name}: internet-facing")
        check(ann.get(a + "healthcheck-path") == "/readyz", f"aws {name}: NLB health check on /readyz")
        check("preserve_client_ip.enabled=true" in ann.get(a + "target-group-attributes", ""), f"aws {name}: client IP preserved")
        check("load_balancing.cross_zone.enabled=true" in ann.get(a + "attributes", ""),
              f"aws {name}: cross-zone (its one pod may be in any zone the NLB spans)")
        subnets = [s for s in ann.get(a + "subnets", "").split(",") if s.strip()]
        allocs = [s for s in ann.get(a + "eip-allocations", "").split(",") if s.strip()]
        check(allocs and len(allocs) == len(subnets), f"aws {name}: one EIP per subnet ({len(allocs)} EIPs, {len(subnets)} subnets)")
        eips += allocs
    check(len(set(eips)) == len(eips), "aws: no EIP shared by two relays")
    check(get("Namespace", NAMESPACE).get("metadata", {}).get("labels", {}).get("elbv2.k8s.aws/pod-readiness-gate-inject")
          == "enabled", "aws: pod readiness gates (a relay is Ready once its NLB target is healthy)")
    listed = [r.strip() for r in (env.get("ZTNA_RELAYS") or "").split(",") if r.strip()]
    check(len(listed) == replicas and len(set(listed)) == len(listed) and all(r.endswith(":4433") for r in listed),
          f"aws: ZTNA_RELAYS lists one public address per relay ({replicas}): {listed}")
    check(conn.get("hostNetwork") is True, "aws: connector on the host network (XDP on the node's NIC)")
    check(set(cc["securityContext"]["capabilities"].get("add", [])) == {"BPF", "NET_ADMIN", "NET_RAW", "IPC_LOCK"},
          "aws: exactly the XDP capabilities")
    check(env.get("ZTNA_XDP") == "native", "aws: native XDP")
    check("sysctls" not in conn.get("securityContext", {}), "aws: no pod sysctls with hostNetwork")
else:
    errors.append(f"unknown overlay {overlay}")

if errors:
    for e in errors:
        print(f"deploy/k8s ({overlay}): {e}", file=sys.stderr)
    sys.exit(1)

if len(sys.argv) > 4 and sys.argv[3] == "--extract":
    out = Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    for daemon, w in (("relay", workloads["ztna-relay"]), ("connector", workloads["ztna-connector"])):
        cm = by_prefix("ConfigMap", f"ztna-{daemon}-config")[0]
        (out / f"{daemon}.toml").write_text(cm["data"][f"{daemon}.toml"])
        spec = w["spec"]["template"]["spec"]
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
        names = []
        if daemon == "connector":
            names = sorted({host_of(r) for r in conn_cfg.get("relays", []) if not is_ip(host_of(r))})
        lines = [
            f"# podman run arguments of {w['kind'].lower()} ztna-{daemon} ({overlay} overlay), from {rendered}",
            f"POD_ARGS=({' '.join(shlex.quote(a) for a in args)})",
            f"POD_CONFIG_DIR={shlex.quote(mounts['config'])}",
            f"POD_PKI_DIR={shlex.quote(mounts['pki'])}",
            f"POD_CMD=({' '.join(shlex.quote(a) for a in c.get('args', []))})",
            f"POD_USER={user}",
            f"POD_RELAY_NAMES=({' '.join(shlex.quote(n) for n in names)})",
        ]
        (out / f"{daemon}.sh").write_text("\n".join(lines) + "\n")

print(f"deploy/k8s ({overlay}): {len(docs)} objects, {replicas} relays, {len(public)} per-relay LoadBalancers: all assertions hold")
