//! Integration tests of orchestratord in the HOME profile: real pool-managerd, real
//! llama-server engines, the tiny model, real HTTP and SSE. The one fake is
//! `fault_engine`, a fault injector that drops or refuses completions; `engine_faults` puts
//! the fault proxy between orchestratord and a real engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admission;
mod browser;
mod cancel;
mod cloud;
mod daemon_faults;
mod determinism;
mod durability;
mod engine_faults;
mod fault_engine;
mod handoff_faults;
mod harness;
mod http_faults;
mod idle;
mod lifecycle;
mod memory;
mod metrics_lint;
mod openai;
mod random;
mod restart;
mod roles;
mod sessions;
mod streaming;
mod tls;
mod trace;
mod ui;
