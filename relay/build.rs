//! Builds the XDP program in `../relay-ebpf/xdp` from source for `bpfel-unknown-none` and
//! leaves it in `OUT_DIR/ztna-relay-xdp.o`, where `src/xdp` embeds it (see
//! `../xdp-loader/ebpf_build.rs`, shared with the connector).

#[path = "../xdp-loader/ebpf_build.rs"]
mod ebpf_build;

fn main() {
    let manifest = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../xdp-loader/ebpf_build.rs").display()
    );
    ebpf_build::run(&ebpf_build::Program {
        ebpf_dir: manifest.join("..").join("relay-ebpf"),
        binary: "ztna-relay-xdp",
        object: "ztna-relay-xdp.o",
        cfg: "ztna_relay_xdp_object",
        daemon: "the relay",
    });
}
