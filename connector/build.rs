//! Builds the XDP program in `../connector-ebpf/xdp` from source for `bpfel-unknown-none` and leaves it in
//! `OUT_DIR/ztna-xdp.o`, where `src/dataplane/xdp` embeds it (`../xdp-loader/ebpf_build.rs`, shared with
//! the relay).

#[path = "../xdp-loader/ebpf_build.rs"]
mod ebpf_build;

fn main() {
    ebpf_build::main_for(
        "connector-ebpf",
        "ztna-connector-xdp",
        "ztna-xdp.o",
        "ztna_xdp_object",
        "the connector",
    );
}
