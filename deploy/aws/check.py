#!/usr/bin/env python3
"""Offline checks of deploy/aws (no terraform here: python-hcl2 parses the files).

Asserts what the walk-through relies on, renders each cloud-init template with the variables
main.tf passes to it (test values) into OUTDIR for `cloud-init schema`, and fails if a template
uses a variable main.tf does not pass. Usage: check.py OUTDIR (run by deploy/check.sh).
"""

import re
import sys
import tomllib
from pathlib import Path

import hcl2
import yaml

HERE = Path(__file__).resolve().parent
errors = []


def check(cond, what):
    if not cond:
        errors.append(what)


def unq(v):
    """A string literal as python-hcl2 returns it, without its quotes."""
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v


def load(name):
    with open(HERE / name) as f:
        return hcl2.load(f)


def blocks(doc, kind):
    """{(type, name): body} of every `kind` block ("resource", "data", ...)."""
    out = {}
    for entry in doc.get(kind, []):
        for typ, named in entry.items():
            for name, body in named.items():
                out[(unq(typ), unq(name))] = body
    return out


main = load("main.tf")
variables = {unq(k) for e in load("variables.tf").get("variable", []) for k in e}
outputs = {unq(k) for e in load("outputs.tf").get("output", []) for k in e}
res = blocks(main, "resource")
text = "".join((HERE / f).read_text() for f in ("main.tf", "outputs.tf"))

# Every var.X is declared.
for used in sorted(set(re.findall(r"\bvar\.(\w+)", text))):
    check(used in variables, f"var.{used} is used but not declared in variables.tf")

# Instances: source/destination checking on everywhere (none routes for others), IMDSv2 only,
# encrypted root volumes.
instances = {n: b for (t, n), b in res.items() if t == "aws_instance"}
check(set(instances) == {"relay", "connector", "service"}, f"instances: {sorted(instances)}")
for name, body in instances.items():
    check(body.get("source_dest_check") is True, f"aws_instance.{name}: source_dest_check must be true")
    md = (body.get("metadata_options") or [{}])[0]
    check(unq(md.get("http_tokens")) == "required", f"aws_instance.{name}: IMDSv2 (http_tokens = required)")
    rb = (body.get("root_block_device") or [{}])[0]
    check(rb.get("encrypted") is True, f"aws_instance.{name}: root volume not encrypted")

check("aws_subnet.public" in instances["relay"]["subnet_id"], "the relay is in the public subnet")
check("aws_subnet.private" in instances["connector"]["subnet_id"], "the connector is in the private subnet")
check("aws_subnet.private" in instances["service"]["subnet_id"], "the service is in the private subnet")
eip = res.get(("aws_eip", "relay"), {})
check("aws_instance.relay.id" in str(eip.get("instance")), "the relay has an Elastic IP")


def ingress(sg):
    return [
        (unq(r.get("protocol")), r.get("from_port"), r.get("to_port"), r.get("cidr_blocks"))
        for r in res[("aws_security_group", sg)].get("ingress", [])
    ]


for port in (4433, 4435):
    check(("udp", port, port, ['"0.0.0.0/0"']) in ingress("relay") or ("udp", port, port, ["0.0.0.0/0"]) in ingress("relay"),
          f"relay security group: UDP {port} from anywhere ({ingress('relay')})")
check(any(p == "udp" and a == 4434 == b for p, a, b, _ in ingress("connector")),
      f"connector security group: UDP 4434 ({ingress('connector')})")
check(not any(b == 22 or a == 22 for _, a, b, _ in ingress("relay") + ingress("connector")),
      "no SSH port is open (Session Manager instead)")
check({"relay_address", "agent_config"} <= outputs, f"outputs: {sorted(outputs)}")
check(re.search(r'^\s*relays = \["\$\{aws_eip\.relay\.public_ip\}:4433"\]$', (HERE / "outputs.tf").read_text(), re.M),
      "agent_config: relays = [the relay's Elastic IP and port]")

# Templates: the variables each uses are the ones main.tf passes.
tests = {
    "release_url": "https://example.com/ztna-0.1.0-linux-x86_64.tar.gz",
    "release_sha256": "0" * 64,
    "ca_pem": "-----BEGIN CERTIFICATE-----\n      MIIBtest\n      -----END CERTIFICATE-----",
    "cert_pem": "-----BEGIN CERTIFICATE-----\n      MIIBtest\n      -----END CERTIFICATE-----",
    "key_parameter": "/ztna/relay.key",
    "region": "eu-west-1",
    "relay_addr": "198.51.100.10:4433",
    "service_ip": "10.0.1.20",
    "xdp_mtu": "3498",
}
outdir = Path(sys.argv[1])
outdir.mkdir(parents=True, exist_ok=True)
for name, body in instances.items():
    ud = body.get("user_data", "")
    m = re.search(r'(templatefile|file)\("\$\{path\.module\}/([\w.-]+)"(.*)\)\}$', ud, re.S)
    check(m is not None, f"aws_instance.{name}: user_data is not a file of this module")
    if not m:
        continue
    fn, tmpl, args = m.group(1), m.group(2), m.group(3)
    source = (HERE / tmpl).read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)\}", source))
    passed = set(re.findall(r"(\w+)\s*=", args)) if fn == "templatefile" else set()
    check(used <= passed, f"{tmpl}: uses {sorted(used - passed)} that main.tf does not pass")
    check(not re.search(r"%\{", source), f"{tmpl}: no template directives expected")
    rendered = re.sub(r"(?<!\$)\$\{(\w+)\}", lambda v: tests.get(v.group(1), "X"), source).replace("$${", "${")
    (outdir / f"{name}-user-data.yaml").write_text(rendered)
    doc = yaml.safe_load(rendered)
    check(rendered.startswith("#cloud-config\n"), f"{tmpl}: must start with #cloud-config")
    runcmd = " ".join(str(c) for c in doc.get("runcmd", []))
    paths = [w["path"] for w in doc.get("write_files", [])]
    if name in ("relay", "connector"):
        check(f"ztna-{name}.service" in runcmd, f"{tmpl}: does not start ztna-{name}.service")
        check(f"/etc/ztna/{name}.toml" in paths, f"{tmpl}: writes no /etc/ztna/{name}.toml")
        check("sha256sum -c" in rendered, f"{tmpl}: the release is not checked against its hash")
        check(not re.search(r"BEGIN [A-Z ]*PRIVATE KEY", rendered) and "_key" not in tests,
              f"{tmpl}: no private key in user-data")
    if name == "connector":
        check("/usr/local/sbin/ztna-xdp-prep" in paths, "connector: no XDP preparation")
        conn = tomllib.loads(next(w["content"] for w in doc["write_files"] if w["path"] == "/etc/ztna/connector.toml"))
        check(conn.get("relays") == [tests["relay_addr"]] and "relay" not in conn,
              f"connector: relays = [the relay's address] (has relays = {conn.get('relays')}, relay = {conn.get('relay')})")
        check('xdp = "native"' in rendered, "connector: xdp = native expected")

if errors:
    for e in errors:
        print(f"deploy/aws: {e}", file=sys.stderr)
    sys.exit(1)
print(f"deploy/aws: {len(res)} resources, {len(instances)} instances, {len(outputs)} outputs: all assertions hold")
