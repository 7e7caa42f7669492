//! Builds the XDP program in `../connector-ebpf/xdp` from source for `bpfel-unknown-none` and
//! leaves it in `OUT_DIR/ztna-xdp.o`, where `src/dataplane/xdp` embeds it.
//!
//! The eBPF build needs the `rust-src` component and `bpf-linker` (`scripts/setup.sh` installs
//! both) and uses `RUSTC_BOOTSTRAP=1` for `-Z build-std=core` on the pinned stable toolchain.
//! Without them the connector is built without the program (a cargo warning says so; the
//! connector then runs on sockets), unless `ZTNA_REQUIRE_EBPF=1`, when the build fails.
//! The eBPF crate gets its own target directory, `<target>/ebpf`, shared by every profile.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("..").join("connector-ebpf");
    for p in [
        "xdp/src",
        "xdp/Cargo.toml",
        "xdp/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=ZTNA_REQUIRE_EBPF");
    println!("cargo::rustc-check-cfg=cfg(ztna_xdp_object)");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let required = env::var("ZTNA_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    match build(&ebpf.join("xdp"), &out) {
        Ok(()) => println!("cargo:rustc-cfg=ztna_xdp_object"),
        Err(e) if required => {
            eprintln!("error: building the XDP program failed and ZTNA_REQUIRE_EBPF=1:\n{e}");
            std::process::exit(1);
        }
        Err(e) => {
            for line in
                format!("XDP program not built, the connector will use sockets only: {e}").lines()
            {
                println!("cargo:warning={line}");
            }
        }
    }
}

/// `<target>/ebpf`, from `OUT_DIR` = `<target>/[<triple>/]<profile>/build/<pkg>/out`.
fn ebpf_target_dir(out: &Path) -> PathBuf {
    out.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map_or_else(|| out.join("ebpf-target"), |t| t.join("ebpf"))
}

fn build(crate_dir: &Path, out: &Path) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = ebpf_target_dir(out);
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1");
    // The outer build's compiler wrappers (clippy), flags and target must not leak into the
    // eBPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("could not run cargo for the eBPF crate: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The last lines that say something (not cargo's progress).
        let progress = [
            "Compiling",
            "Downloaded",
            "Downloading",
            "Locking",
            "Updating",
            "Blocking",
        ];
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !progress.iter().any(|p| l.trim_start().starts_with(p)))
            .rev()
            .take(25)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "`cargo build` of {} for bpfel-unknown-none failed ({}); it needs `rustup component add rust-src` and `cargo install --locked bpf-linker@0.10.4` (scripts/setup.sh):\n{}",
            crate_dir.display(),
            output.status,
            tail.join("\n")
        ));
    }
    let object = target_dir.join("bpfel-unknown-none/release/ztna-connector-xdp");
    std::fs::copy(&object, out.join("ztna-xdp.o"))
        .map_err(|e| format!("copying {}: {e}", object.display()))?;
    Ok(())
}
