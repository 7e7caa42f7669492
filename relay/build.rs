//! Builds the XDP program in `../relay-ebpf/xdp` from source for `bpfel-unknown-none` and leaves it in
//! `OUT_DIR/ztna-relay-xdp.o`, where `src/xdp` embeds it (`../xdp-loader/ebpf_build.rs`, shared with
//! the connector).

#[path = "../xdp-loader/ebpf_build.rs"]
mod ebpf_build;

fn main() {
    ebpf_build::main_for(
        "relay-ebpf",
        "ztna-relay-xdp",
        "ztna-relay-xdp.o",
        "ztna_relay_xdp_object",
        "the relay",
    );
}
