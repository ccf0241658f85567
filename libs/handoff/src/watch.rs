//! Directory watcher: `notify` for immediate reaction plus a periodic rescan as safety net
//! (missed events, filesystems without inotify). Each distinct content of a file is reported
//! once (content digest), so rescans never repeat an event.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use llorch_contracts::handoff::{is_valid_pool_id, HandoffError};
use llorch_contracts::HandoffFile;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::is_handoff_path;

#[derive(Debug)]
pub enum HandoffEvent {
    /// A valid file appeared or changed. `seen_at` is when the watcher noticed it.
    Upserted {
        path: PathBuf,
        file: HandoffFile,
        seen_at: Instant,
    },
    /// A file appeared or changed but is not a valid handoff file. `label` is the file stem
    /// when it is a valid pool id, else `_invalid` (bounded metric labels).
    Invalid {
        path: PathBuf,
        label: String,
        error: HandoffError,
    },
    /// A file reported before is gone.
    Removed { path: PathBuf, seen_at: Instant },
}

/// Watches `dir` until `cancel`; events arrive on the returned channel. The first rescan runs
/// at once, so files already present are reported too.
pub fn watch_dir(
    dir: PathBuf,
    rescan: Duration,
    cancel: CancellationToken,
) -> (mpsc::Receiver<HandoffEvent>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let handle = tokio::spawn(run(dir, rescan, cancel, tx));
    (rx, handle)
}

/// What the `notify` callback passes to the loop.
enum Wake {
    /// An event that may have changed what this path says.
    Path(PathBuf),
    /// The kernel dropped events (queue overflow): only a full rescan is exact.
    Rescan,
}

/// Whether an event can change what a handoff file says: create, data modification, close
/// after write, rename in or out, removal. Reading a file raises open, access and
/// close-without-write events on the same watch; reacting to those would make every read
/// trigger the next one (and two daemons watching one directory would wake each other).
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        // A backend that cannot tell the kind: judge the file.
        EventKind::Any => true,
        EventKind::Other => false,
    }
}

async fn run(
    dir: PathBuf,
    rescan: Duration,
    cancel: CancellationToken,
    tx: mpsc::Sender<HandoffEvent>,
) {
    // The directory may not exist yet (the other daemon creates it too); a watch needs it.
    if let Err(error) = std::fs::create_dir_all(&dir) {
        tracing::warn!(%error, dir = %dir.display(), "cannot create handoff directory");
    }
    let (ntx, mut nrx) = mpsc::unbounded_channel::<Wake>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.need_rescan() {
            let _ = ntx.send(Wake::Rescan);
        } else if may_change_content(&event.kind) {
            for path in event.paths {
                let _ = ntx.send(Wake::Path(path));
            }
        }
    });
    // Held for the whole loop; without it the periodic rescan still works.
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch handoff directory; relying on periodic rescan");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "file watcher unavailable; relying on periodic rescan");
            None
        }
    };
    let mut state = DirState {
        dir,
        known: HashMap::new(),
        empty: HashSet::new(),
    };
    let mut tick = tokio::time::interval(rescan);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let work = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(first) = nrx.recv() => {
                // Everything already queued is judged in one pass: a burst of events on one
                // file reads it once.
                let mut work = Work::default();
                work.add(first, &state.dir);
                while let Ok(more) = nrx.try_recv() {
                    work.add(more, &state.dir);
                }
                work
            }
            _ = tick.tick() => Work { rescan: true, ..Work::default() },
        };
        if work.is_empty() {
            continue;
        }
        // File reads block: they run on the blocking pool, not on an async worker.
        let done = tokio::task::spawn_blocking(move || {
            let events = state.apply(&work);
            (state, events)
        })
        .await;
        let events;
        (state, events) = match done {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(%error, "handoff directory scan failed; watcher stopped");
                return;
            }
        };
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// One pass of the loop: the paths events named, or a whole-directory rescan.
#[derive(Default)]
struct Work {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
}

impl Work {
    fn add(&mut self, wake: Wake, dir: &Path) {
        match wake {
            Wake::Rescan => self.rescan = true,
            Wake::Path(path) => {
                if is_handoff_path(&path) && path.parent() == Some(dir) {
                    self.paths.insert(path);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        !self.rescan && self.paths.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Event,
    Rescan,
}

struct DirState {
    dir: PathBuf,
    /// Digest of the last content reported per path.
    known: HashMap<PathBuf, u64>,
    /// Paths the last rescan found empty.
    empty: HashSet<PathBuf>,
}

impl DirState {
    fn apply(&mut self, work: &Work) -> Vec<HandoffEvent> {
        if work.rescan {
            return self.rescan();
        }
        let now = Instant::now();
        work.paths
            .iter()
            .filter_map(|p| self.check(p, now, Source::Event))
            .collect()
    }

    fn rescan(&mut self) -> Vec<HandoffEvent> {
        let now = Instant::now();
        let mut present = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                // Whatever its type: a symlink or a FIFO under a handoff name is reported.
                if is_handoff_path(&path) {
                    present.push(path);
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        present
            .iter()
            .chain(gone.iter())
            .filter_map(|p| self.check(p, now, Source::Rescan))
            .collect()
    }

    fn check(&mut self, path: &Path, seen_at: Instant, source: Source) -> Option<HandoffEvent> {
        let bytes = match read_handoff(path) {
            Ok(b) => b,
            Err(Unread::Gone) => {
                self.empty.remove(path);
                return self.known.remove(path).map(|_| HandoffEvent::Removed {
                    path: path.to_path_buf(),
                    seen_at,
                });
            }
            Err(Unread::Refused(reason)) => {
                // Reported once per reason, like a content: rescans do not repeat it.
                let digest = digest(reason.as_bytes()) ^ 0x5bd1_e995;
                if self.known.insert(path.to_path_buf(), digest) == Some(digest) {
                    return None;
                }
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                return Some(HandoffEvent::Invalid {
                    path: path.to_path_buf(),
                    label: if is_valid_pool_id(&stem) {
                        stem
                    } else {
                        "_invalid".into()
                    },
                    error: HandoffError::Invalid(reason),
                });
            }
            Err(Unread::Io(error)) => {
                tracing::warn!(path = %path.display(), %error, "cannot read handoff file");
                return None;
            }
        };
        // A writer that is not atomic (create or truncate, then write) shows an empty file
        // first; its next event carries the content. A file is judged empty only when two
        // rescans in a row found it so, since a rescan can also land in that moment.
        if bytes.is_empty() {
            let judged = source == Source::Rescan && !self.empty.insert(path.to_path_buf());
            if !judged {
                return None;
            }
        } else {
            self.empty.remove(path);
        }
        let digest = digest(&bytes);
        if self.known.insert(path.to_path_buf(), digest) == Some(digest) {
            return None;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parsed = HandoffFile::parse(&bytes).and_then(|f| {
            if f.pool_id == stem {
                Ok(f)
            } else {
                Err(HandoffError::Invalid(format!(
                    "file name must be {}.json for pool_id {:?}",
                    f.pool_id, f.pool_id
                )))
            }
        });
        Some(match parsed {
            Ok(file) => HandoffEvent::Upserted {
                path: path.to_path_buf(),
                file,
                seen_at,
            },
            Err(error) => HandoffEvent::Invalid {
                path: path.to_path_buf(),
                label: if is_valid_pool_id(&stem) {
                    stem
                } else {
                    "_invalid".into()
                },
                error,
            },
        })
    }
}

/// The largest handoff file read (a real one is well under 2 KiB).
const HANDOFF_MAX_BYTES: u64 = 64 * 1024;

enum Unread {
    Gone,
    /// Not read on purpose: the reason says why.
    Refused(String),
    Io(std::io::Error),
}

/// Reads a handoff file without trusting the directory: a symlink is not followed, a FIFO or
/// device does not block (opened non-blocking, then refused as not a regular file), a file over
/// `HANDOFF_MAX_BYTES` is not read, and one that another user owns or anyone may write is
/// refused.
fn read_handoff(path: &Path) -> Result<Vec<u8>, Unread> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Unread::Gone),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Unread::Refused(
                "is a symbolic link (not followed: write the file itself)".into(),
            ))
        }
        Err(e) => return Err(Unread::Io(e)),
    };
    let meta = file.metadata().map_err(Unread::Io)?;
    if !meta.file_type().is_file() {
        return Err(Unread::Refused("is not a regular file".into()));
    }
    if meta.len() > HANDOFF_MAX_BYTES {
        return Err(Unread::Refused(format!(
            "is {} bytes, over the {HANDOFF_MAX_BYTES}-byte limit",
            meta.len()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(Unread::Refused(
            "is writable by any user (chmod o-w)".into(),
        ));
    }
    if meta.uid() != 0 && meta.uid() != effective_uid() {
        return Err(Unread::Refused(format!(
            "is owned by uid {}, neither this daemon's user nor root",
            meta.uid()
        )));
    }
    let mut bytes = Vec::new();
    file.take(HANDOFF_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(Unread::Io)?;
    Ok(bytes)
}

/// This daemon's effective user.
#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str) -> HandoffFile {
        HandoffFile::external(id, "http://127.0.0.1:1", "m", 1)
    }

    async fn next(rx: &mut mpsc::Receiver<HandoffEvent>) -> HandoffEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event within 5 s")
            .expect("watcher ended")
    }

    #[tokio::test]
    async fn reports_create_atomic_rename_modify_invalid_and_delete_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        // Long rescan: events must come from notify; the first rescan runs at once.
        let (mut rx, handle) = watch_dir(
            dir.path().to_path_buf(),
            Duration::from_secs(3600),
            cancel.clone(),
        );
        tokio::task::yield_now().await;

        crate::write_atomic(dir.path(), &file("a")).unwrap();
        assert!(
            matches!(next(&mut rx).await, HandoffEvent::Upserted { file, .. } if file.pool_id == "a")
        );

        let mut changed = file("a");
        changed.slots_total = 3;
        std::fs::write(
            dir.path().join("a.json"),
            serde_json::to_vec(&changed).unwrap(),
        )
        .unwrap();
        let ev = next(&mut rx).await;
        assert!(
            matches!(&ev, HandoffEvent::Upserted { file, .. } if file.slots_total == 3),
            "{ev:?}"
        );

        std::fs::write(dir.path().join("b.json"), b"{oops").unwrap();
        assert!(matches!(next(&mut rx).await, HandoffEvent::Invalid { label, .. } if label == "b"));

        std::fs::write(
            dir.path().join("c.json"),
            serde_json::to_vec(&file("other")).unwrap(),
        )
        .unwrap();
        assert!(matches!(next(&mut rx).await, HandoffEvent::Invalid { label, .. } if label == "c"));

        std::fs::remove_file(dir.path().join("a.json")).unwrap();
        assert!(
            matches!(next(&mut rx).await, HandoffEvent::Removed { path, .. } if path.ends_with("a.json"))
        );

        cancel.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn non_atomic_writes_are_reported_once_with_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let (mut rx, handle) = watch_dir(
            dir.path().to_path_buf(),
            Duration::from_secs(3600),
            cancel.clone(),
        );
        // Wait until the watcher runs (past its first rescan) before the slow writes.
        crate::write_atomic(dir.path(), &file("sentinel")).unwrap();
        assert!(matches!(next(&mut rx).await, HandoffEvent::Upserted { .. }));
        // Create-then-write, as `echo > file` does: the empty moment is not an invalid file.
        for (name, body) in [
            ("x.json", b"{ not json".to_vec()),
            ("y.json", serde_json::to_vec(&file("y")).unwrap()),
        ] {
            let path = dir.path().join(name);
            let f = std::fs::File::create(&path).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::io::Write::write_all(&mut &f, &body).unwrap();
            drop(f);
        }
        let first = next(&mut rx).await;
        assert!(
            matches!(&first, HandoffEvent::Invalid { label, .. } if label == "x"),
            "{first:?}"
        );
        let second = next(&mut rx).await;
        assert!(
            matches!(&second, HandoffEvent::Upserted { file, .. } if file.pool_id == "y"),
            "{second:?}"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "a write was reported twice"
        );
        cancel.cancel();
        handle.await.unwrap();
    }

    #[test]
    fn only_events_that_can_change_a_file_wake_the_watcher() {
        use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};
        let wakes = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Remove(RemoveKind::File),
        ];
        for kind in wakes {
            assert!(may_change_content(&kind), "{kind:?} must wake the watcher");
        }
        // What a reader of the file (this daemon or its neighbour) raises.
        let quiet = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        ];
        for kind in quiet {
            assert!(
                !may_change_content(&kind),
                "{kind:?} must not wake the watcher"
            );
        }
    }

    #[tokio::test]
    async fn rescan_alone_finds_files_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        crate::write_atomic(dir.path(), &file("pre")).unwrap();
        let mut state = DirState {
            dir: dir.path().to_path_buf(),
            known: HashMap::new(),
            empty: HashSet::new(),
        };
        let first = state.rescan();
        assert_eq!(first.len(), 1);
        assert!(state.rescan().is_empty(), "unchanged file reported twice");
        std::fs::remove_file(dir.path().join("pre.json")).unwrap();
        assert!(matches!(
            state.rescan().as_slice(),
            [HandoffEvent::Removed { .. }]
        ));
        assert!(state.rescan().is_empty());
        // An empty file may be a writer's moment between truncate and write: it is judged
        // only when the next rescan finds it empty still.
        std::fs::write(dir.path().join("e.json"), b"").unwrap();
        assert!(state.rescan().is_empty(), "an empty moment was judged");
        assert!(matches!(
            state.rescan().as_slice(),
            [HandoffEvent::Invalid { label, .. }] if label == "e"
        ));
    }

    #[test]
    fn symlinks_fifos_oversized_and_world_writable_files_are_refused_once_without_blocking() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        crate::write_atomic(elsewhere.path(), &file("link")).unwrap();
        std::os::unix::fs::symlink(
            elsewhere.path().join("link.json"),
            dir.path().join("link.json"),
        )
        .unwrap();
        let fifo = dir.path().join("fifo.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let mut big = serde_json::to_vec(&file("big")).unwrap();
        big.resize(HANDOFF_MAX_BYTES as usize + 1, b' ');
        std::fs::write(dir.path().join("big.json"), big).unwrap();
        crate::write_atomic(dir.path(), &file("open")).unwrap();
        let open = dir.path().join("open.json");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        crate::write_atomic(dir.path(), &file("good")).unwrap();
        let mut state = DirState {
            dir: dir.path().to_path_buf(),
            known: HashMap::new(),
            empty: HashSet::new(),
        };
        let events = state.rescan();
        let mut refused: Vec<(String, String)> = events
            .iter()
            .filter_map(|e| match e {
                HandoffEvent::Invalid { label, error, .. } => {
                    Some((label.clone(), error.to_string()))
                }
                _ => None,
            })
            .collect();
        refused.sort();
        let labels: Vec<&str> = refused.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["big", "fifo", "link", "open"], "{refused:?}");
        assert!(refused[0].1.contains("limit"));
        assert!(refused[1].1.contains("regular file"));
        assert!(refused[2].1.contains("symbolic link"));
        assert!(refused[3].1.contains("any user"));
        assert!(events
            .iter()
            .any(|e| matches!(e, HandoffEvent::Upserted { file, .. } if file.pool_id == "good")));
        assert!(state.rescan().is_empty(), "refusals repeated by a rescan");
    }
}
