# The production build stage's image: the pinned Rust toolchain plus what the connector's XDP
# program needs (rust-src for -Z build-std, bpf-linker). Build it once, then pass it to the
# daemon images as BUILDER:
#
#   podman build -f deploy/images/Containerfile.builder -t ztna-builder .
#   deploy/images/build.sh --from-source --builder localhost/ztna-builder
#
# Not built by deploy/check.sh: no registry is reachable there, so the check builds the images
# from the release binaries of the test suite instead (same Containerfiles, other BUILDER).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
FROM ${RUST_IMAGE}
RUN rustup component add rust-src && cargo install --locked bpf-linker@0.10.4
