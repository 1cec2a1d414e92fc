//! The research harness: what the `ferry` command runs to measure and train, kept apart from
//! the operator commands (chat, status, models, keys) and from the daemons.
//!
//! - [`replay`]: a routing policy replayed over public per-request labels (the MESS+ authors'
//!   Llama measurements), with its baselines; [`routellm`]: RouteLLM's labels and metrics (CPT,
//!   APGR); [`synthetic`]: generated model zoos in joules and dollars; [`plot`]: the figures;
//!   [`replay::ceiling`]: the most a ranking on the question could save, in hindsight.
//! - [`prior`]: training the difficulty prior on other benchmarks' labels.
//! - [`policy`]: TMO placement policies trained and evaluated on the M4A1 log (`ferry policy`).
//! - [`bench`]: the engine, encoder and router benchmarks, each beside its peer.

pub mod bench;
pub mod plot;
pub mod policy;
pub mod prior;
pub mod replay;
pub mod routellm;
pub mod synthetic;
