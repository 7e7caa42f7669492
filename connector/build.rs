//! Builds the XDP program in `../connector-ebpf/xdp` from source for `bpfel-unknown-none` and
//! leaves it in `OUT_DIR/ztna-xdp.o`, where `src/dataplane/xdp` embeds it (see
//! `../xdp-loader/ebpf_build.rs`, shared with the relay).

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
        ebpf_dir: manifest.join("..").join("connector-ebpf"),
        binary: "ztna-connector-xdp",
        object: "ztna-xdp.o",
        cfg: "ztna_xdp_object",
        daemon: "the connector",
    });
}
