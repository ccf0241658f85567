//! Integration tests of orchestratord in the HOME profile: real pool-managerd, real
//! llama-server engines, the tiny model, real HTTP and SSE. The one fake is
//! `fault_engine`, a fault injector that accepts connections and drops them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admission;
mod cancel;
mod cloud;
mod determinism;
mod fault_engine;
mod harness;
mod idle;
mod lifecycle;
mod memory;
mod metrics_lint;
mod openai;
mod random;
mod restart;
mod sessions;
mod streaming;
mod trace;
