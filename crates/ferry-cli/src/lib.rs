//! The library behind the `ferry` command's operator side: connecting to ferryd (TCP or Unix
//! socket), its status, installing the bundled models from the package registry and checking
//! that they answer, tokens and development certificates, and the offload and time-to-first-token
//! benchmarks against running daemons. The research harness (replays, policy training, plots, the engine and router
//! benchmarks) is the `ferry_lab` crate. `main.rs` is only the argument parsing and dispatch.

pub mod answers;
pub mod certs;
pub mod client;
pub mod fetch;
pub mod offload_bench;
pub mod status;
pub mod ttft_bench;
