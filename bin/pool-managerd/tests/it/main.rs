//! Integration tests of pool-managerd: the real binary, real llama-server engines, the tiny
//! model, real HTTP. A broken model file (which llama-server refuses to load) stands in for a
//! crashing engine; no fake engine is used here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod config;
mod control;
mod handoff;
mod harness;
mod idle;
mod lifecycle;
mod proxy;
mod supervision;
