#!/usr/bin/env bash
# Validates every deployment artefact in deploy/ and runs what can run on one machine:
#
#   1. systemd units: systemd-analyze verify (any output fails) and security --offline with a
#      threshold;
#   2. Kubernetes: render both overlays (kubectl kustomize, with a throwaway PKI from
#      `ztna-relay pki`), validate against the Kubernetes schemas in strict mode
#      (kubernetes-validate), assert what docs/deploy.md promises (k8s/check.py: the relay
#      fleet's StatefulSet, headless Service, one LoadBalancer per relay, the connector's
#      `relays`), policy scan (checkov);
#   3. EC2: python-hcl2 assertions and cloud-init rendering (aws/check.py: there is no terraform
#      here), checkov on the Terraform, `cloud-init schema` on the rendered user-data;
#   4. images: deploy/images/build.sh from the release binaries (no compiling in a container);
#   5. traffic: the relay and connector images run under podman with the args, environment,
#      user, capabilities and config files of the rendered home overlay, each in a network
#      namespace of deploy/netns/topo.sh (one relay of the fleet: the connector's headless
#      Service name resolves to it, as cluster DNS would to every relay pod); the agent (host
#      binary) in a third; ping, UDP echo and HTTP through the relay path, with numbers;
#   6. systemd for real: a systemd container (podman --systemd=always) starts the three units,
#      reports them active and ready, and restarts the relay after kill -9 (timed); an invalid
#      configuration (the relay's, and a connector's with both `relay` and `relays`) exits 78
#      and stays down.
#
# Needs root and what scripts/setup.sh installs; the release binaries must be built
# (cargo build --release --workspace --bins). Everything it starts (containers, namespaces,
# processes) is removed on exit, also on failure. Prints the time of each step.
#
# Environment: ZTNA_BIN_DIR (default ${CARGO_TARGET_DIR:-target}/release), ZTNA_VENV_ROOT
# (default /opt/ztna-venv), ZTNA_IMAGE_CACHE (the mmdebstrap tarballs; default
# ${CARGO_TARGET_DIR:-target}/deploy), DEPLOY_CHECK_KEEP=1 keeps the work directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${ZTNA_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
VENV=${ZTNA_VENV_ROOT:-/opt/ztna-venv}
PY=$VENV/validate/bin/python
CHECKOV=$VENV/checkov/bin/checkov
RUN_ID=$(printf '%04x' $((RANDOM % 65536)))
PREFIX=zd$RUN_ID # network namespaces ${PREFIX}-relay, ... (short: interface and netns names)
TAG=check$RUN_ID
WORK=$(mktemp -d /tmp/ztna-deploy-check.XXXXXX)
PIDS=()
CONTAINERS=()
# podman sets RLIMIT_NOFILE and RLIMIT_NPROC in every container; without CAP_SYS_RESOURCE (as in
# this project's sandboxes) it may not raise them above this shell's hard limits.
nofile=$(ulimit -Hn)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
LIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

T0=$SECONDS
STEP_T=$SECONDS
STEP_NAME=""
TIMES=()
step() {
    if [[ -n $STEP_NAME ]]; then TIMES+=("$(printf '%4d s  %s' $((SECONDS - STEP_T)) "$STEP_NAME")"); fi
    STEP_NAME=$1
    STEP_T=$SECONDS
    printf '\n==> [%4ds] %s\n' $((SECONDS - T0)) "$1"
}
die() { printf 'deploy/check.sh: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if ((rc != 0)); then
        printf '\n==> FAILED (exit %d) in "%s"; logs in %s\n' "$rc" "$STEP_NAME" "$WORK" >&2
        for f in "$WORK"/*.log; do
            [[ -f $f ]] || continue
            printf -- '----- %s -----\n' "$f" >&2
            tail -n 20 "$f" >&2
        done
    fi
    for c in "${CONTAINERS[@]}"; do podman rm -f -t 2 "$c" >/dev/null 2>&1; done
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    bash "$ROOT/deploy/netns/topo.sh" down "$PREFIX" >/dev/null 2>&1
    for i in relay connector agent; do podman rmi -f "localhost/ztna-$i:$TAG" >/dev/null 2>&1; done
    if [[ ${DEPLOY_CHECK_KEEP:-0} == 1 || $rc -ne 0 ]]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $(id -u) -eq 0 ]] || die "run as root (podman, network namespaces, systemd containers)"

step "prerequisites (installed by scripts/setup.sh)"
for t in podman mmdebstrap kubectl systemd-analyze cloud-init curl jq python3 ip; do
    command -v "$t" >/dev/null || die "$t is missing: run scripts/setup.sh"
done
[[ -x $PY && -x $CHECKOV ]] || die "the validators' venvs under $VENV are missing: run scripts/setup.sh"
for b in ztna-relay ztna-connector ztna-agent ztna-test-udp-echo; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing: cargo build --release --workspace --bins"
done
echo "binaries: $BIN; venvs: $VENV; work: $WORK"

step "PKI for the checks (ztna-relay pki)"
PKI=$WORK/pki
"$BIN/ztna-relay" pki init --dir "$PKI" --org "ztna deploy check" >/dev/null
"$BIN/ztna-relay" pki issue --dir "$PKI" --role relay --name relay >/dev/null
"$BIN/ztna-relay" pki issue --dir "$PKI" --role connector --name conn1 >/dev/null
"$BIN/ztna-relay" pki issue --dir "$PKI" --role agent --name alice --group eng >/dev/null
ls "$PKI"

# ---------------------------------------------------------------------------------------------
step "systemd: systemd-analyze verify (any output fails) and security --offline"
UNITS=$WORK/units
mkdir -p "$UNITS"
for f in deploy/systemd/*.service; do
    # verify checks that ExecStart's program exists: point it at the built binaries.
    sed "s#/usr/local/bin/#$BIN/#" "$f" >"$UNITS/$(basename "$f")"
done
cp "$UNITS/ztna-agent@.service" "$UNITS/ztna-agent@alice.service"
verify_units=("$UNITS/ztna-relay.service" "$UNITS/ztna-connector.service" "$UNITS/ztna-agent@alice.service")
out=$(cd "$UNITS" && systemd-analyze verify "${verify_units[@]}" 2>&1) || die "systemd-analyze verify failed: $out"
[[ -z $out ]] || die "systemd-analyze verify printed (unknown keys and mistakes only warn): $out"
echo "verify: 3 units, no output"
# Exposure is 0.0 (best) to 10.0; the threshold is in tenths. 3.0 and below is systemd's "OK".
SECURITY_THRESHOLD=30
(cd "$UNITS" && systemd-analyze security --offline=true --threshold=$SECURITY_THRESHOLD \
    "${verify_units[@]}" >"$WORK/systemd-security.txt" 2>&1) ||
    die "systemd-analyze security: exposure above $SECURITY_THRESHOLD/10: $(grep Overall "$WORK/systemd-security.txt")"
grep 'Overall exposure' "$WORK/systemd-security.txt"

# ---------------------------------------------------------------------------------------------
step "Kubernetes: render, schema-validate (strict), assert, policy-scan"
K8S=$WORK/k8s
cp -r deploy/k8s "$K8S"
for f in ca.pem relay.pem relay.key; do cp "$PKI/$f" "$K8S/base/pki/$f"; done
cp "$PKI/conn1.pem" "$K8S/base/pki/connector.pem"
cp "$PKI/conn1.key" "$K8S/base/pki/connector.key"
for o in home aws; do
    kubectl kustomize "$K8S/overlays/$o" >"$WORK/k8s-$o.yaml"
    echo "$o: $(grep -c '^kind:' "$WORK/k8s-$o.yaml") objects rendered"
    "$VENV/validate/bin/kubernetes-validate" --strict --quiet "$WORK/k8s-$o.yaml" ||
        die "$o: kubernetes-validate --strict failed"
    echo "$o: schema-valid (kubernetes-validate --strict, Kubernetes $("$VENV/validate/bin/kubernetes-validate" --version | awk '{print $NF}'))"
    "$PY" deploy/k8s/check.py "$WORK/k8s-$o.yaml" "$o" --extract "$WORK/pod-$o"
    "$CHECKOV" --quiet --compact --skip-download --framework kubernetes -f "$WORK/k8s-$o.yaml" \
        >"$WORK/checkov-k8s-$o.txt" 2>&1 || { cat "$WORK/checkov-k8s-$o.txt"; die "$o: checkov found policy failures"; }
    echo "$o: checkov $(grep -o 'Passed checks: [0-9]*, Failed checks: [0-9]*, Skipped checks: [0-9]*' "$WORK/checkov-k8s-$o.txt")"
done

# ---------------------------------------------------------------------------------------------
step "EC2: Terraform assertions (python-hcl2), checkov, cloud-init schema"
"$PY" deploy/aws/check.py "$WORK/user-data"
"$CHECKOV" --quiet --compact --skip-download --framework terraform -d deploy/aws \
    >"$WORK/checkov-aws.txt" 2>&1 || { cat "$WORK/checkov-aws.txt"; die "aws: checkov found policy failures"; }
echo "aws: checkov $(grep -o 'Passed checks: [0-9]*, Failed checks: [0-9]*, Skipped checks: [0-9]*' "$WORK/checkov-aws.txt")"
for f in "$WORK"/user-data/*.yaml; do
    cloud-init schema --config-file "$f" >"$WORK/cloud-init.txt" 2>&1 || { cat "$WORK/cloud-init.txt"; die "cloud-init schema: $f"; }
    echo "$(basename "$f"): $(tail -n 1 "$WORK/cloud-init.txt")"
done

# ---------------------------------------------------------------------------------------------
step "images: deploy/images/build.sh (release binaries, local Debian base)"
export ZTNA_IMAGE_CACHE=${ZTNA_IMAGE_CACHE:-${CARGO_TARGET_DIR:-$ROOT/target}/deploy}
bash deploy/images/build.sh --bin-dir "$BIN" --tag "$TAG"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ":$TAG " || true
# The images run: each binary prints its version as the image's user.
for i in relay connector agent; do
    v=$(podman run --rm --pull=never --network none "${LIMITS[@]}" "localhost/ztna-$i:$TAG" --version)
    echo "ztna-$i:$TAG runs: $v (as $(podman image inspect --format '{{.Config.User}}' "localhost/ztna-$i:$TAG"))"
done

# ---------------------------------------------------------------------------------------------
step "traffic: relay and connector images under podman (home overlay's pod specs), agent on the host side"
# shellcheck source=deploy/netns/topo.sh
source deploy/netns/topo.sh
topo_up "$PREFIX"
POD=$WORK/pod-home
# The Secrets as the pods see them: mode 0440, group of the pod's fsGroup.
for d in relay connector; do
    # shellcheck disable=SC1090
    source "$POD/$d.sh"
    mkdir -p "$WORK/secret-$d" "$WORK/config-$d"
    cp "$POD/$d.toml" "$WORK/config-$d/"
    cp "$PKI/ca.pem" "$WORK/secret-$d/"
    if [[ $d == relay ]]; then
        cp "$PKI/relay.pem" "$PKI/relay.key" "$WORK/secret-$d/"
    else
        cp "$PKI/conn1.pem" "$WORK/secret-$d/connector.pem"
        cp "$PKI/conn1.key" "$WORK/secret-$d/connector.key"
    fi
    chown -R "0:$POD_USER" "$WORK/secret-$d" "$WORK/config-$d"
    chmod 0750 "$WORK/secret-$d" "$WORK/config-$d"
    chmod 0440 "$WORK/secret-$d"/*
    chmod 0444 "$WORK/config-$d"/*
    node=$([[ $d == relay ]] && echo relay || echo conn)
    extra=()
    # The connector's `relays` (the ConfigMap's, unchanged) name the relays' headless Service:
    # here the name resolves to the one relay container, as cluster DNS would to the pods.
    if [[ $d == connector ]]; then
        ((${#POD_RELAY_NAMES[@]})) || die "the connector's relays name no headless Service"
        for n in "${POD_RELAY_NAMES[@]}"; do extra+=(--add-host "$n:$TOPO_RELAY_ADDR"); done
    fi
    name=ztna-check-$d-$RUN_ID
    podman run -d --name "$name" --pull=never --network "ns:/run/netns/$PREFIX-$node" "${LIMITS[@]}" \
        "${POD_ARGS[@]}" "${extra[@]}" \
        -v "$WORK/config-$d:$POD_CONFIG_DIR:ro" -v "$WORK/secret-$d:$POD_PKI_DIR:ro" \
        "localhost/ztna-$d:$TAG" "${POD_CMD[@]}" >/dev/null
    CONTAINERS+=("$name")
    echo "podman run $name in $PREFIX-$node: ${POD_ARGS[*]} ${extra[*]} ${POD_CMD[*]}"
done

# Backend services: UDP echo on 7, HTTP on 80 (a 4 MiB file for a download).
mkdir -p "$WORK/www"
head -c $((4 * 1024 * 1024)) /dev/urandom >"$WORK/www/blob"
echo ok >"$WORK/www/index.html"
ip netns exec "$PREFIX-backend" "$BIN/ztna-test-udp-echo" "$TOPO_BACKEND_ADDR:7" --exit-after 600 >"$WORK/udp-echo.log" 2>&1 &
PIDS+=($!)
(cd "$WORK/www" && exec ip netns exec "$PREFIX-backend" python3 -m http.server 80 --bind "$TOPO_BACKEND_ADDR") >"$WORK/http.log" 2>&1 &
PIDS+=($!)

# readyz of both containers, from the namespaces they run in.
http_in() { ip netns exec "$PREFIX-$1" curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$2" || true; }
ok=0
for _ in $(seq 60); do
    if [[ $(http_in relay http://127.0.0.1:9090/readyz) == 200 && $(http_in conn http://127.0.0.1:9090/readyz) == 200 ]]; then ok=1; break; fi
    sleep 0.5
done
podman logs "ztna-check-relay-$RUN_ID" >"$WORK/relay.log" 2>&1 || true
podman logs "ztna-check-connector-$RUN_ID" >"$WORK/connector.log" 2>&1 || true
((ok)) || die "relay or connector container not ready within 30 s (relay /readyz $(http_in relay http://127.0.0.1:9090/readyz), connector /readyz $(http_in conn http://127.0.0.1:9090/readyz))"
echo "relay /readyz 200, /healthz $(http_in relay http://127.0.0.1:9090/healthz); connector /readyz 200 (registered with the relay)"

# The agent: the host binary in the agent namespace, direct paths off, so every packet crosses
# both containers (agent -> relay container -> connector container -> backend).
cat >"$WORK/agent.toml" <<EOF
relays = ["$TOPO_RELAY_ADDR:4433"]
relay_name = "relay"
ca = "$PKI/ca.pem"
cert = "$PKI/alice.pem"
key = "$PKI/alice.key"
status_socket = "$WORK/agent.sock"
direct_paths = false
EOF
ip netns exec "$PREFIX-agent" "$BIN/ztna-agent" up --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
ok=0
for _ in $(seq 60); do
    if ip netns exec "$PREFIX-agent" ping -n -c 1 -W 1 10.100.0.1 >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
done
((ok)) || die "no ping answer through the containers within 30 s"

ping_out=$(ip netns exec "$PREFIX-agent" ping -n -q -c 50 -i 0.05 -W 2 10.100.0.1)
PING_LOSS=$(grep -o '[0-9.]*% packet loss' <<<"$ping_out" | cut -d% -f1)
PING_RTT=$(grep -o 'rtt [^=]*= [0-9./]*' <<<"$ping_out" | awk '{print $4}')
echo "ping 10.100.0.1 (echo service, ICMP): 50 sent, ${PING_LOSS}% loss, rtt min/avg/max/mdev ${PING_RTT} ms"
[[ ${PING_LOSS%.*} -le 2 ]] || die "ping loss ${PING_LOSS}%"

UDP_OUT=$(ip netns exec "$PREFIX-agent" python3 - <<'EOF'
import socket, time, statistics
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
rtts, n = [], 200
for i in range(n):
    msg = b"ztna-%06d" % i + b"x" * 1000
    t = time.perf_counter()
    s.sendto(msg, ("10.100.0.1", 7))
    try:
        while True:
            data, _ = s.recvfrom(2048)
            if data == msg:
                rtts.append((time.perf_counter() - t) * 1000)
                break
    except socket.timeout:
        pass
print(f"{len(rtts)} {n} {statistics.median(rtts) if rtts else 0:.3f} {max(rtts) if rtts else 0:.3f}")
EOF
)
read -r UDP_OK UDP_N UDP_MED UDP_MAX <<<"$UDP_OUT"
echo "UDP echo 10.100.0.1:7: $UDP_OK/$UDP_N datagrams of 1010 bytes echoed, median RTT $UDP_MED ms, max $UDP_MAX ms"
((UDP_OK >= UDP_N * 98 / 100)) || die "UDP echo: only $UDP_OK of $UDP_N"

codes=""
for _ in $(seq 10); do
    codes+=$(ip netns exec "$PREFIX-agent" curl -s -o /dev/null -w '%{http_code} %{time_total}\n' --max-time 5 http://10.100.0.4/)$'\n'
done
HTTP_OK=$(grep -c '^200 ' <<<"$codes" || true)
HTTP_MED=$(awk '/^200 / {print $2 * 1000}' <<<"$codes" | sort -n | awk '{a[NR]=$1} END {if (NR) printf "%.1f", a[int((NR+1)/2)]}')
DL=$(ip netns exec "$PREFIX-agent" curl -s -o /dev/null -w '%{http_code} %{size_download} %{speed_download}' --max-time 30 http://10.100.0.4/blob)
read -r DL_CODE DL_SIZE DL_SPEED <<<"$DL"
DL_MBIT=$(awk -v s="$DL_SPEED" 'BEGIN {printf "%.0f", s * 8 / 1e6}')
echo "curl http://10.100.0.4/ (web service, TCP 80): $HTTP_OK/10 answered 200, median $HTTP_MED ms; 4 MiB download: HTTP $DL_CODE, $DL_SIZE bytes, $DL_MBIT Mbit/s"
[[ $HTTP_OK -eq 10 && $DL_CODE == 200 && $DL_SIZE -eq $((4 * 1024 * 1024)) ]] || die "HTTP through the tunnel failed"

metric() { ip netns exec "$PREFIX-$1" curl -s --max-time 2 http://127.0.0.1:9090/metrics | awk -v m="$2" '$1 == m {print $2}'; }
FWD=$(metric relay ztna_relay_datagrams_forwarded_total)
FROM_AGENTS=$(metric conn ztna_connector_packets_from_agents_total)
echo "metrics: relay forwarded $FWD datagrams; connector took $FROM_AGENTS packets from agents"
[[ ${FWD:-0} -gt 0 && ${FROM_AGENTS:-0} -gt 0 ]] || die "the traffic did not cross the relay container"
# Every metric the docs' PromQL and the Grafana dashboard name is one the daemons serve.
ip netns exec "$PREFIX-relay" curl -s --max-time 2 http://127.0.0.1:9090/metrics >"$WORK/metrics.txt"
ip netns exec "$PREFIX-conn" curl -s --max-time 2 http://127.0.0.1:9090/metrics >>"$WORK/metrics.txt"
served=$(awk '!/^#/ {print $1}' "$WORK/metrics.txt" | sort -u)
named=$(grep -oh 'ztna_\(relay\|connector\)_[a-z_]*' docs/deploy.md deploy/grafana/ztna.json | sort -u)
missing=$(comm -13 <(echo "$served") <(echo "$named"))
[[ -z $missing ]] || die "docs/deploy.md or deploy/grafana/ztna.json name metrics nobody serves: $missing"
echo "metrics: the $(wc -l <<<"$named") names in docs/deploy.md and deploy/grafana/ztna.json are all served"
podman logs "ztna-check-relay-$RUN_ID" >"$WORK/relay.log" 2>&1 || true
podman logs "ztna-check-connector-$RUN_ID" >"$WORK/connector.log" 2>&1 || true
for c in "${CONTAINERS[@]}"; do podman rm -f -t 2 "$c" >/dev/null 2>&1; done
CONTAINERS=()
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
wait 2>/dev/null || true
PIDS=()
topo_down "$PREFIX"

# ---------------------------------------------------------------------------------------------
step "systemd for real: the three units in a systemd container; kill -9 and restart"
SDBASE=$(bash deploy/images/base.sh systemd)
SD=$WORK/sd
mkdir -p "$SD/bin" "$SD/etc/pki" "$SD/units"
cp "$BIN/ztna-relay" "$BIN/ztna-connector" "$BIN/ztna-agent" "$SD/bin/"
cp deploy/systemd/*.service "$SD/units/"
cp "$PKI/ca.pem" "$PKI/relay.pem" "$PKI/relay.key" "$PKI/alice.pem" "$PKI/alice.key" "$SD/etc/pki/"
cp "$PKI/conn1.pem" "$SD/etc/pki/connector.pem"
cp "$PKI/conn1.key" "$SD/etc/pki/connector.key"
chmod 0600 "$SD"/etc/pki/*.key
cat >"$SD/etc/relay.toml" <<'EOF'
bind = "127.0.0.1:4433"
metrics = "127.0.0.1:9090"
[[services]]
name = "echo"
address = "10.100.0.1"
[[access]]
services = ["echo"]
groups = ["eng"]
[[connectors]]
identity = "conn1"
services = ["echo"]
EOF
# The connector and the agent here use `relay`, the one-relay form (the traffic step above
# uses the list, `relays`): both must keep working.
cat >"$SD/etc/connector.toml" <<'EOF'
relay = "127.0.0.1:4433"
bind = "127.0.0.1:4434"
metrics = "127.0.0.1:9091"
icmp = "local"
[[services]]
name = "echo"
address = "10.100.0.1"
backend = "127.0.0.1"
udp = [7]
EOF
cat >"$SD/etc/agent-alice.toml" <<'EOF'
relay = "127.0.0.1:4433"
bind = "127.0.0.1:0"
EOF
SDC=ztna-check-systemd-$RUN_ID
mounts=(-v "$SD/etc:/etc/ztna:ro")
for b in ztna-relay ztna-connector ztna-agent; do mounts+=(-v "$SD/bin/$b:/usr/local/bin/$b:ro"); done
for u in "$SD"/units/*.service; do mounts+=(-v "$u:/etc/systemd/system/$(basename "$u"):ro"); done
# `/` shared, as systemd makes it on a real host (podman makes it private): systemd hands
# LoadCredential= files over through a mount that must propagate back from a child namespace.
# /dev/net/tun as udev makes it on a systemd host (0666: TUN devices are reserved by
# CAP_NET_ADMIN, not by the node's mode); this machine's is 0600.
podman run -d --name "$SDC" --pull=never --systemd=always --privileged --network none "${LIMITS[@]}" \
    "${mounts[@]}" "$SDBASE" sh -c 'mount --make-rshared / && chmod 0666 /dev/net/tun && exec /sbin/init' >/dev/null
CONTAINERS+=("$SDC")
in_sd() { podman exec "$SDC" "$@"; }
for _ in $(seq 60); do
    state=$(in_sd systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    sleep 0.5
done
echo "systemd in the container: $(in_sd systemctl --version | head -n 1), system $state"
in_sd systemctl start ztna-relay.service ztna-connector.service ztna-agent@alice.service ||
    { in_sd journalctl --no-pager -n 40 >"$WORK/journal.log" 2>&1; die "a unit failed to start (Type=notify: no READY=1)"; }
for u in ztna-relay ztna-connector ztna-agent@alice; do
    printf '%s: %s, %s, "%s"\n' "$u" "$(in_sd systemctl is-active "$u.service")" \
        "$(in_sd systemctl show -p User --value "$u.service" | sed 's/^$/(dynamic user)/')" \
        "$(in_sd systemctl show -p StatusText --value "$u.service")"
done
ok=0
for _ in $(seq 40); do
    if [[ $(in_sd curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9091/readyz) == 200 ]]; then ok=1; break; fi
    sleep 0.5
done
((ok)) || die "the connector unit did not register with the relay unit"
echo "connector unit /readyz 200: registered with the relay unit"
in_sd journalctl --no-pager -o cat -u ztna-agent@alice.service | grep -q 'ztna-agent up' || die "agent unit not up"

# kill -9 the relay's main process; time until systemd has a new one active (RestartSec=1s).
RESTART=$(in_sd sh -c '
    old=$(systemctl show -p MainPID --value ztna-relay.service)
    t0=$(date +%s%N)
    kill -9 "$old"
    i=0
    while [ $i -lt 300 ]; do
        new=$(systemctl show -p MainPID --value ztna-relay.service)
        if [ "$new" != 0 ] && [ "$new" != "$old" ] && [ "$(systemctl is-active ztna-relay.service)" = active ]; then
            echo "$old $new $(( ($(date +%s%N) - t0) / 1000000 )) $(systemctl show -p NRestarts --value ztna-relay.service)"
            exit 0
        fi
        i=$((i + 1))
        sleep 0.02
    done
    echo "$old none -1 -1"')
read -r OLD_PID NEW_PID RESTART_MS NRESTARTS <<<"$RESTART"
[[ $NEW_PID != none ]] || die "the relay was not restarted within 6 s of kill -9"
echo "kill -9 of ztna-relay (PID $OLD_PID): active again as PID $NEW_PID after $RESTART_MS ms (NRestarts=$NRESTARTS; RestartSec=1s, Type=notify: counted to READY=1)"
# An invalid configuration exits 78 and is not restarted (RestartPreventExitStatus=78).
in_sd sh -c 'mkdir -p /run/systemd/system/ztna-relay.service.d && printf "[Service]\nEnvironment=ZTNA_KEEPALIVE_SECS=0\n" > /run/systemd/system/ztna-relay.service.d/bad.conf && systemctl daemon-reload'
in_sd systemctl restart ztna-relay.service >/dev/null 2>&1 || true
sleep 2.5
BAD=$(in_sd systemctl show -p ExecMainStatus -p NRestarts -p ActiveState ztna-relay.service | tr '\n' ' ')
echo "with keepalive_secs = 0: $BAD"
[[ $BAD == *ExecMainStatus=78* && $BAD == *ActiveState=failed* ]] || die "an invalid configuration should exit 78 and stay down: $BAD"
# So does a connector given both `relay` (its file) and `relays` (ZTNA_RELAYS in a drop-in).
in_sd sh -c 'mkdir -p /run/systemd/system/ztna-connector.service.d && printf "[Service]\nEnvironment=ZTNA_RELAYS=127.0.0.1:4433,127.0.0.2:4433\n" > /run/systemd/system/ztna-connector.service.d/bad.conf && systemctl daemon-reload'
in_sd systemctl restart ztna-connector.service >/dev/null 2>&1 || true
sleep 2.5
BAD=$(in_sd systemctl show -p ExecMainStatus -p NRestarts -p ActiveState ztna-connector.service | tr '\n' ' ')
echo "connector with both relay and relays: $BAD"
[[ $BAD == *ExecMainStatus=78* && $BAD == *ActiveState=failed* ]] || die "a connector given both relay and relays should exit 78 and stay down: $BAD"

step "done"
echo
echo "deploy/check.sh: every check passed in $((SECONDS - T0)) s"
for t in "${TIMES[@]}"; do echo "  $t"; done
echo "  traffic (relay path, containers): ping ${PING_LOSS}% loss avg $(cut -d/ -f2 <<<"$PING_RTT") ms; UDP echo $UDP_OK/$UDP_N median $UDP_MED ms; HTTP $HTTP_OK/10 median $HTTP_MED ms, 4 MiB at $DL_MBIT Mbit/s"
echo "  systemd: relay restarted $RESTART_MS ms after kill -9"
