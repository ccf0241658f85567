//! The in-process layer of pool-managerd's tests: the real supervisor with scripted engines
//! behind the launcher and probe seams (`kit`), on tokio's paused clock, so restart backoff,
//! the breaker, hang detection, start timeouts, drain and shutdown are asserted to the
//! millisecond. The process tests in `tests/it` prove the same on the real `llama-server`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod handoff_bounds;
mod kit;
mod proxy_bounds;
mod registration_bounds;
mod supervisor_bounds;
