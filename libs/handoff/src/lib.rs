//! Handoff files (`{runtime_dir}/{pool_id}.json`, DESIGN §4) on disk, shared by pool-managerd
//! (writes its own, ingests external ones) and HOME-profile orchestratord (reads them).

mod file;
mod watch;

pub use file::{is_handoff_path, now_ms, path_for, remove, write_atomic};
pub use watch::{watch_dir, HandoffEvent};
