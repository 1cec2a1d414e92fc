//! Generated gRPC and prost code for `proto/ferry/v1`.
//!
//! The Rust in `src/gen/` is produced by `tonic-prost-build` and checked in, so building ferry —
//! including cross-builds for Jetson — never needs `protoc`. `tests/codegen.rs` regenerates it with
//! a vendored protoc and fails when the checked-in code drifts from the `.proto` files; run it with
//! `FERRY_BLESS=1` to rewrite `src/gen/` after editing a `.proto`.

/// `ferry.v1`: the app-facing `Inference` service (`inference.proto`), the edge-to-cloud
/// `Offload` service (`offload.proto`), and their messages.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!("gen/ferry.v1.rs");
}

/// Encoded `FileDescriptorSet` of every ferry proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/ferry_descriptor.bin");
