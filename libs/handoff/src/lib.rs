//! Handoff files (`{runtime_dir}/{pool_id}.json`, DESIGN §4) on disk, shared by pool-managerd
//! (writes its own, ingests external ones) and HOME-profile orchestratord (reads them).

mod engine_key;
mod file;
mod watch;

pub use engine_key::{key_path, read_key, remove_key, write_key};
pub use file::{is_handoff_path, now_ms, path_for, remove, write_atomic};
pub use watch::{watch_dir, watch_dir_with, HandoffEvent};
