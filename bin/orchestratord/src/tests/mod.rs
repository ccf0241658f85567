//! The in-process layer of orchestratord's tests: the real admission, dispatcher, runner and
//! retention with a scripted engine (`kit`), on tokio's paused clock, so every timing bound is
//! asserted exactly and the whole layer runs in well under a second. The process tests in
//! `tests/it` prove the same behaviours end to end on the real engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache_bounds;
mod cloud_bounds;
mod ctx_bounds;
mod home_bounds;
mod journal_bounds;
pub(crate) mod kit;
mod queue_bounds;
mod resume_bounds;
mod roles;
mod router;
mod runner_bounds;
mod strict_bounds;
