//! Build-script helper that compiles an XDP program crate for `bpfel-unknown-none`, shared by
//! `connector/build.rs` and `relay/build.rs` (each includes this file with `#[path]`; a
//! build-dependency crate would compile the loader's dependencies a second time).
//!
//! The eBPF build needs the `rust-src` component and `bpf-linker` (`scripts/setup.sh` installs
//! both) and uses `RUSTC_BOOTSTRAP=1` for `-Z build-std=core` on the pinned stable toolchain.
//! Without them the daemon is built without its program (a cargo warning says so; it then runs
//! on sockets), unless `ZTNA_REQUIRE_EBPF=1`, when the build fails. eBPF crates get their own
//! target directory, `<target>/ebpf`, shared by every profile.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An XDP program crate to build.
struct Program<'a> {
    /// The eBPF crates' directory (`<crate>/xdp` and `<crate>/common` inside it).
    ebpf_dir: PathBuf,
    /// The program crate's binary name.
    binary: &'a str,
    /// File name of the object in `OUT_DIR`.
    object: &'a str,
    /// `cfg` set when the object was built.
    cfg: &'a str,
    /// Who runs on sockets without it, for the warning ("the connector").
    daemon: &'a str,
}

/// The whole build script of a daemon whose eBPF crates are in `../EBPF_DIR` (beside the
/// daemon's crate): builds `binary` into `OUT_DIR/OBJECT` and sets `cfg` when it was built.
pub(crate) fn main_for(ebpf_dir: &str, binary: &str, object: &str, cfg: &str, daemon: &str) {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../xdp-loader/ebpf_build.rs").display()
    );
    run(&Program {
        ebpf_dir: manifest.join("..").join(ebpf_dir),
        binary,
        object,
        cfg,
        daemon,
    });
}

/// Builds `p`, or warns, or fails under `ZTNA_REQUIRE_EBPF=1`.
fn run(p: &Program<'_>) {
    for sub in [
        "xdp/src",
        "xdp/Cargo.toml",
        "xdp/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", p.ebpf_dir.join(sub).display());
    }
    println!("cargo:rerun-if-env-changed=ZTNA_REQUIRE_EBPF");
    println!("cargo::rustc-check-cfg=cfg({})", p.cfg);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let required = env::var("ZTNA_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    match build(&p.ebpf_dir.join("xdp"), p.binary, &out.join(p.object)) {
        Ok(()) => println!("cargo:rustc-cfg={}", p.cfg),
        Err(e) if required => {
            eprintln!("error: building the XDP program failed and ZTNA_REQUIRE_EBPF=1:\n{e}");
            std::process::exit(1);
        }
        Err(e) => {
            for line in format!(
                "XDP program not built, {} will use sockets only: {e}",
                p.daemon
            )
            .lines()
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

fn build(crate_dir: &Path, binary: &str, object_out: &Path) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = ebpf_target_dir(object_out.parent().expect("OUT_DIR/object"));
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
    let object = target_dir.join("bpfel-unknown-none/release").join(binary);
    std::fs::copy(&object, object_out).map_err(|e| format!("copying {}: {e}", object.display()))?;
    Ok(())
}
