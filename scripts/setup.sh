#!/usr/bin/env bash
# Install everything ztna's demo and test suite need on a fresh Debian 12, as root.
# Idempotent: packages already present are left alone; a second run is quick.
set -euo pipefail

PACKAGES=(
    iproute2        # ip netns, veth, bridge
    iputils-ping    # ping
    dnsutils        # dig
    dnsmasq-base    # dnsmasq binary only (no system service is started)
    dbus-daemon     # e2e/tests/names.rs: a private system bus for a test systemd-resolved
    libsystemd-shared # the library the unpacked systemd-resolved links (below)
    tcpdump         # the relay_is_blind capture
    nftables        # NAT routers in later topologies
    curl            # Prometheus metrics
    socat           # UDP echo round trip in the demo; TCP sinks/sources in e2e/tests/tcp.rs
    nginx-light     # HTTP backend of e2e/tests/tcp.rs (run with a temporary config, no service)
    postgresql      # PostgreSQL server + psql for e2e/tests/tcp.rs (throwaway cluster per test)
    coreutils       # sha256sum, timeout
    util-linux      # setpriv (PostgreSQL runs as the postgres user)
    netcat-openbsd  # nc -u / nc -z
    iperf3          # throughput checks and benchmarks
    jq              # status JSON in scripts
    bpftool         # e2e/tests/xdp.rs: no XDP program left on the interface
    ethtool         # bench/: GRO on the veth for the relay's native-XDP forwarding run
    procps          # sysctl, pkill
    psmisc          # killall, fuser
    ca-certificates
    build-essential # cc for crates that build C
    pkg-config
    wireguard-go    # bench/: userspace WireGuard in Go
    wireguard-tools # bench/: `wg` configures boringtun and wireguard-go
    python3-matplotlib # bench/chart.py draws the PNG chart
    # deploy/check.sh: images, systemd units, cloud-init user-data, PyPI validators
    podman          # builds and runs the images (as root, with runc)
    buildah
    runc            # crun fails on this machine's cgroup setup
    mmdebstrap      # the local base image, from Debian's packages (no registry is reachable)
    cloud-init      # `cloud-init schema` (disabled as a service below, before it is installed)
    python3-venv    # the venvs of the PyPI validators
    valgrind        # agent-apple: the C harness under valgrind (e2e/tests/apple_harness.rs)
    clang-14        # agent-apple: ring's C for the macOS targets (scripts/check-apple-targets.sh)
    llvm-14         # agent-apple: llvm-ar/llvm-nm for Mach-O archives
)

# Cargo-installed tools: name, version, binary. boringtun-cli is bench/'s userspace WireGuard in
# Rust (about 50 s to build on 2 cores).
CARGO_TOOLS=(
    "boringtun-cli 0.7.1 boringtun-cli"
    # Links the connector's XDP program (connector-ebpf/xdp). 0.10.4 uses the Rust toolchain's
    # own LLVM; newer releases want a newer LLVM than the pinned toolchain has.
    "bpf-linker 0.10.4 bpf-linker"
    # Generates agent-apple/include/ztna.h; CI diffs a fresh one against it.
    "cbindgen 0.29.0 cbindgen"
)

log() { printf '[setup] %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh: must run as root (try: sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# cloud-init is installed only for `cloud-init schema`: it must never configure this machine at
# boot. The marker file disables every cloud-init stage.
mkdir -p /etc/cloud
[[ -e /etc/cloud/cloud-init.disabled ]] || touch /etc/cloud/cloud-init.disabled

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    log "apt-get update"
    apt-get update -qq
    installable=()
    for p in "${missing[@]}"; do
        # `apt-cache policy` prints "Candidate: (none)" (or nothing) for a name the archive lacks.
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $cand || $cand == "(none)" ]]; then
            echo "setup.sh: package '$p' has no installation candidate in the configured archives" >&2
            exit 1
        fi
        installable+=("$p")
    done
    log "apt-get install ${installable[*]}"
    apt-get install -y -qq --no-install-recommends "${installable[@]}" >/dev/null
else
    log "system packages already installed"
fi

# The toolchain (pinned by rust-toolchain.toml) is preinstalled; rustup here cannot download
# toolchains, only the components that ship with the installed one may be added.
if command -v rustup >/dev/null 2>&1; then
    cd "$(dirname "$0")/.."
    comps=$(rustup component list --installed 2>/dev/null || true)
    # rust-src: the connector's XDP program is built with -Z build-std=core (connector/build.rs).
    for c in rustfmt clippy rust-src; do
        if ! grep -q "^$c" <<<"$comps"; then
            log "rustup component add $c"
            rustup component add "$c"
        fi
    done
    # agent-apple: the macOS targets its static library is built for (no Apple SDK needed).
    targets=$(rustup target list --installed 2>/dev/null || true)
    for t in aarch64-apple-darwin x86_64-apple-darwin; do
        if ! grep -qx "$t" <<<"$targets"; then
            log "rustup target add $t"
            rustup target add "$t"
        fi
    done
else
    command -v cargo >/dev/null 2>&1 || {
        echo "setup.sh: neither rustup nor cargo found; install the Rust toolchain 1.95.0 first" >&2
        exit 1
    }
fi

# ~/.cargo/bin may not be on root's PATH (sudo): look there too.
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
for tool in "${CARGO_TOOLS[@]}"; do
    read -r name version binary <<<"$tool"
    have=$(PATH=$PATH:$CARGO_BIN "$binary" --version 2>/dev/null || true)
    if [[ $have != *" $version"* ]]; then
        log "cargo install --locked $name@$version"
        cargo install --locked --quiet "$name@$version"
    fi
done

# systemd-resolved for e2e/tests/names.rs, unpacked, not installed: installing it would point
# this machine's /etc/resolv.conf at a resolver that nothing starts here. The test runs it
# in a mount namespace of its own, inside the agent's network namespace.
RESOLVED_ROOT=${ZTNA_RESOLVED_ROOT:-/opt/ztna-resolved}
if [[ ! -x $RESOLVED_ROOT/lib/systemd/systemd-resolved ]]; then
    log "unpacking systemd-resolved into $RESOLVED_ROOT"
    deb_dir=$(mktemp -d)
    # As root into a private directory: no _apt sandbox user needed (and no warning about it).
    (cd "$deb_dir" && apt-get download -qq -o APT::Sandbox::User=root systemd-resolved)
    mkdir -p "$RESOLVED_ROOT"
    dpkg -x "$deb_dir"/systemd-resolved_*.deb "$RESOLVED_ROOT"
    rm -rf "$deb_dir"
fi

# kubectl renders the Kubernetes overlays (`kubectl kustomize`). The machine image ships one;
# otherwise Debian's kubernetes-client provides it.
if ! command -v kubectl >/dev/null 2>&1; then
    log "apt-get install kubernetes-client (kubectl)"
    apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi

# PyPI validators of deploy/check.sh, pinned, in two venvs: checkov brings its own fork of the
# HCL parser (bc-python-hcl2), which would replace python-hcl2's `hcl2` module in a shared one.
VENV_ROOT=${ZTNA_VENV_ROOT:-/opt/ztna-venv}
pip_venv() {
    local venv=$1
    shift
    if [[ ! -x $venv/bin/python ]]; then
        log "python3 -m venv $venv"
        /usr/bin/python3 -m venv "$venv"
    fi
    local want=()
    for spec in "$@"; do
        local name=${spec%%==*} version=${spec##*==}
        if [[ $("$venv/bin/python" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}') != "$version" ]]; then
            want+=("$spec")
        fi
    done
    if ((${#want[@]})); then
        log "pip install (in $venv) ${want[*]}"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${want[@]}"
    fi
}
pip_venv "$VENV_ROOT/validate" kubernetes-validate==1.37.0 python-hcl2==8.1.4 PyYAML==6.0.3
pip_venv "$VENV_ROOT/checkov" checkov==3.3.30

# agent-apple/scripts/check-swift.py: tree-sitter with the Swift grammar.
pip_venv "$VENV_ROOT/swift" tree-sitter==0.26.1 tree-sitter-swift==0.7.4

log "done"
