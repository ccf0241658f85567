//! Directory watcher: `notify` for immediate reaction plus a periodic rescan as safety net
//! (missed events, filesystems without inotify). Each distinct content of a file is reported
//! once (content digest), so rescans never repeat an event.
//!
//! The watch follows the directory's path, not the directory it first found: when the directory
//! is removed (its files count as deleted) its parent is watched until it is back, and when it
//! is back or replaced (a rename onto its path) the new one is watched and rescanned. Where the
//! parent is gone too, the periodic rescan notices the directory's return. The watcher creates
//! the directory at start only: one removed later stays removed until someone puts it back (a
//! directory created behind an operator's back would catch a `mv staged runtime` inside it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use llorch_contracts::handoff::{is_valid_pool_id, HandoffError};
use llorch_contracts::HandoffFile;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
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
/// at once, so files already present are reported too. A relative `dir` is taken from the
/// current directory at the call.
pub fn watch_dir(
    dir: PathBuf,
    rescan: Duration,
    cancel: CancellationToken,
) -> (mpsc::Receiver<HandoffEvent>, tokio::task::JoinHandle<()>) {
    watch_dir_with(dir, rescan, true, cancel)
}

/// [`watch_dir`]; with `notify` false the periodic rescan alone (filesystems where the kernel
/// reports no writes: network filesystems, some FUSE mounts).
pub fn watch_dir_with(
    dir: PathBuf,
    rescan: Duration,
    notify: bool,
    cancel: CancellationToken,
) -> (mpsc::Receiver<HandoffEvent>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    // `notify` names paths from the absolute form of what it watches: comparing them with a
    // relative `dir` would drop every event.
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let handle = tokio::spawn(run(dir, rescan, notify, cancel, tx));
    (rx, handle)
}

/// What a `notify` callback reports.
#[derive(Debug)]
enum Wake {
    /// An event that may have changed what this handoff file says.
    Path(PathBuf),
    /// The kernel dropped events (queue overflow): only a full rescan is exact.
    Rescan,
    /// The directory watch `watch` was on left the path (removed, or renamed away): that
    /// watch sees nothing more. Needed besides the identity check: a directory created again
    /// often gets the inode of the one removed.
    Left { watch: u64 },
    /// Seen from the parent: something was created at, renamed onto or removed from the path.
    Dir,
}

/// The most paths the inbox holds; past it, one rescan stands for them all.
const INBOX_MAX_PATHS: usize = 4096;

/// What the `notify` callbacks leave for the loop, coalesced: a path named by many events is
/// held once, and past `INBOX_MAX_PATHS` a single rescan replaces the paths. Memory stays
/// bounded however fast files change and however slowly the events are consumed.
#[derive(Default)]
struct Inbox {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Inbox {
    /// Called on `notify`'s thread.
    fn push(&self, wake: Wake) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.add(wake);
        }
        // A wake-up with nobody waiting is kept (one permit): none is lost.
        self.wake.notify_one();
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One pass of the loop: the paths events named, or a whole-directory rescan, and whether the
/// watch must be checked.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pending {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
    /// Check that the watch is on what the path names.
    dir: bool,
    /// The latest directory watch that reported its directory left (watches are numbered up).
    left: Option<u64>,
}

impl Pending {
    fn add(&mut self, wake: Wake) {
        match wake {
            Wake::Dir => self.dir = true,
            Wake::Left { watch } => {
                self.dir = true;
                self.left = self.left.max(Some(watch));
            }
            Wake::Rescan => {
                // A rescan judges every path: the named ones need no second look.
                self.rescan = true;
                self.paths.clear();
            }
            Wake::Path(_) if self.rescan => {}
            Wake::Path(path) => {
                if self.paths.len() < INBOX_MAX_PATHS || self.paths.contains(&path) {
                    self.paths.insert(path);
                } else {
                    self.rescan = true;
                    self.paths.clear();
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        !self.rescan && !self.dir && self.paths.is_empty()
    }
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
    notify: bool,
    cancel: CancellationToken,
    tx: mpsc::Sender<HandoffEvent>,
) {
    // The directory may not exist yet (the other daemon creates it too); a watch needs it.
    if let Err(error) = std::fs::create_dir_all(&dir) {
        tracing::warn!(%error, dir = %dir.display(), "cannot create handoff directory");
    }
    let inbox = Arc::new(Inbox::default());
    let mut scan = Scan {
        watch: DirWatch::new(dir.clone(), Arc::clone(&inbox), notify),
        state: DirState {
            dir,
            known: HashMap::new(),
            empty: HashSet::new(),
        },
    };
    let mut tick = tokio::time::interval(rescan);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let work = tokio::select! {
            _ = cancel.cancelled() => break,
            // Everything queued since the last pass is judged in one pass: a burst of events
            // on one file reads it once.
            _ = inbox.wake.notified() => inbox.take(),
            // The rescan also checks that the watch is still on the directory the path names.
            _ = tick.tick() => Pending { rescan: true, dir: true, ..Pending::default() },
        };
        if work.is_empty() {
            continue;
        }
        // File reads block: they run on the blocking pool, not on an async worker.
        let done = tokio::task::spawn_blocking(move || {
            let events = scan.apply(work);
            (scan, events)
        })
        .await;
        let events;
        (scan, events) = match done {
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

/// The watch and what was reported, moved to the blocking pool for each pass.
struct Scan {
    watch: DirWatch,
    state: DirState,
}

impl Scan {
    fn apply(&mut self, mut work: Pending) -> Vec<HandoffEvent> {
        // A watch that moved missed what happened meanwhile: only a rescan is exact.
        if work.dir && self.watch.refresh(work.left) {
            work.rescan = true;
        }
        self.state.apply(&work)
    }
}

/// A directory's identity: device and inode.
type DirId = (u64, u64);

fn dir_id(dir: &Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    // Follows a symbolic link, as the watch does.
    let meta = std::fs::metadata(dir).ok()?;
    meta.is_dir().then(|| (meta.dev(), meta.ino()))
}

/// Where the `notify` watch is.
enum Watch {
    /// On the directory `id`, the one the path named when watch number `number` was put.
    Dir {
        id: DirId,
        number: u64,
        _watcher: RecommendedWatcher,
    },
    /// On the parent, while the directory is missing: to see it come back.
    Parent { _watcher: RecommendedWatcher },
    /// Nowhere (no watcher, or the parent is missing too): the periodic rescan alone.
    Nowhere,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The directory, by the watch's number.
    Dir(u64),
    Parent,
}

/// Keeps a `notify` watch on the directory `dir` names now.
struct DirWatch {
    dir: PathBuf,
    inbox: Arc<Inbox>,
    on: Watch,
    /// The number of the last directory watch put.
    watches: u64,
    /// The directory was lost (gone, or not watchable): its return is logged.
    lost: bool,
    /// A failure to watch was logged: the same failure on later rescans is not.
    failure_logged: bool,
    /// `false`: no watch is ever put (the periodic rescan alone).
    notify: bool,
}

impl DirWatch {
    fn new(dir: PathBuf, inbox: Arc<Inbox>, notify: bool) -> Self {
        let mut watch = DirWatch {
            dir,
            inbox,
            on: Watch::Nowhere,
            watches: 0,
            lost: false,
            failure_logged: false,
            notify,
        };
        watch.refresh(None);
        watch
    }

    /// Moves the watch onto what the path names now when that changed (removed, created
    /// again, replaced by a rename), or when the directory watch numbered `left` reported its
    /// directory gone (a report of an older watch changes nothing). True when it moved: files
    /// may have come or gone unwatched, so a rescan is due.
    fn refresh(&mut self, left: Option<u64>) -> bool {
        if !self.notify {
            // Every tick is a rescan already.
            return false;
        }
        // Read before the watch is put: a directory replaced in between leaves an id that
        // differs, so the next refresh moves the watch again instead of trusting a stale one.
        let id = dir_id(&self.dir);
        let was_dir = match (&self.on, id) {
            (Watch::Dir { id: on, number, .. }, Some(id)) if *on == id && left != Some(*number) => {
                return false
            }
            (Watch::Parent { .. }, None) => return false,
            (Watch::Dir { .. }, _) => true,
            _ => false,
        };
        // The old watch goes first: it would name paths of a directory no longer there.
        self.on = Watch::Nowhere;
        if was_dir {
            self.lost = true;
        }
        if let Some(id) = id {
            self.watch_dir(id);
            return true;
        }
        if was_dir {
            tracing::warn!(dir = %self.dir.display(), "handoff directory is gone; its files count as deleted until it is back");
        }
        self.lost = true;
        if let Some(parent) = self.dir.parent() {
            match self.watcher(parent, Target::Parent) {
                Ok(watcher) => self.on = Watch::Parent { _watcher: watcher },
                Err(error) => {
                    tracing::debug!(%error, dir = %self.dir.display(), "cannot watch the handoff directory's parent; the periodic rescan will notice its return");
                }
            }
        }
        // It may have come back before the parent was watched.
        if let Some(id) = dir_id(&self.dir) {
            self.on = Watch::Nowhere;
            self.watch_dir(id);
        }
        true
    }

    fn watch_dir(&mut self, id: DirId) {
        self.watches += 1;
        let number = self.watches;
        match self.watcher(&self.dir, Target::Dir(number)) {
            Ok(watcher) => {
                self.on = Watch::Dir {
                    id,
                    number,
                    _watcher: watcher,
                };
                // Logged once per return: a directory created again or renamed onto the path.
                if self.lost {
                    tracing::info!(dir = %self.dir.display(), "handoff directory is back; watching it again");
                }
                self.lost = false;
                self.failure_logged = false;
            }
            Err(error) => {
                self.lost = true;
                if !self.failure_logged {
                    self.failure_logged = true;
                    tracing::warn!(%error, dir = %self.dir.display(), "cannot watch handoff directory; relying on periodic rescan");
                }
            }
        }
    }

    /// A watcher of `path` whose events land in the inbox: on the directory, its handoff
    /// files and itself; on the parent, the directory's name only.
    fn watcher(&self, path: &Path, target: Target) -> notify::Result<RecommendedWatcher> {
        let inbox = Arc::clone(&self.inbox);
        let dir = self.dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let Ok(event) = res else { return };
                if event.need_rescan() {
                    inbox.push(Wake::Rescan);
                } else if may_change_content(&event.kind) {
                    for path in event.paths {
                        match target {
                            // Removed or renamed away: the only events a watch raises on its
                            // own directory that pass `may_change_content`.
                            Target::Dir(watch) if path == dir => inbox.push(Wake::Left { watch }),
                            Target::Dir(_)
                                if path.parent() == Some(dir.as_path())
                                    && is_handoff_path(&path) =>
                            {
                                inbox.push(Wake::Path(path))
                            }
                            Target::Parent if path == dir => inbox.push(Wake::Dir),
                            _ => {}
                        }
                    }
                }
            })?;
        watcher.watch(path, RecursiveMode::NonRecursive)?;
        Ok(watcher)
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
    fn apply(&mut self, work: &Pending) -> Vec<HandoffEvent> {
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
        // A set: finding what is gone must not cost files × known on every rescan.
        let mut present = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                // Whatever its type: a symlink or a FIFO under a handoff name is reported.
                if is_handoff_path(&path) {
                    present.insert(path);
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !present.contains(*p))
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
pub(crate) fn effective_uid() -> u32 {
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

    // covers: POOL-3205
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
        // A plain (non-atomic) write may be read half-written first: reported invalid, then
        // the whole file at the write's last event.
        let mut ev = next(&mut rx).await;
        while matches!(&ev, HandoffEvent::Invalid { label, .. } if label == "a") {
            ev = next(&mut rx).await;
        }
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
        // c.json too may have been read half-written first (invalid for another reason).
        let mut ev = next(&mut rx).await;
        while matches!(&ev, HandoffEvent::Invalid { label, .. } if label == "c") {
            ev = next(&mut rx).await;
        }
        assert!(
            matches!(&ev, HandoffEvent::Removed { path, .. } if path.ends_with("a.json")),
            "{ev:?}"
        );

        cancel.cancel();
        handle.await.unwrap();
    }

    // covers: POOL-3205
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

    // covers: POOL-3205
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

    async fn next_within(rx: &mut mpsc::Receiver<HandoffEvent>, within: Duration) -> HandoffEvent {
        tokio::time::timeout(within, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {within:?}"))
            .expect("watcher ended")
    }

    fn upserted_id(event: &HandoffEvent) -> Option<&str> {
        match event {
            HandoffEvent::Upserted { file, .. } => Some(&file.pool_id),
            _ => None,
        }
    }

    async fn assert_quiet(rx: &mut mpsc::Receiver<HandoffEvent>) {
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            panic!("unexpected event {event:?}");
        }
    }

    #[test]
    fn the_inbox_holds_each_path_once_and_past_its_bound_one_rescan_replaces_them() {
        let mut pending = Pending::default();
        for _ in 0..3 {
            pending.add(Wake::Path(PathBuf::from("/r/a.json")));
        }
        assert_eq!(pending.paths.len(), 1, "one path named thrice is held once");
        for i in 1..INBOX_MAX_PATHS {
            pending.add(Wake::Path(PathBuf::from(format!("/r/p{i}.json"))));
        }
        assert_eq!(pending.paths.len(), INBOX_MAX_PATHS);
        assert!(!pending.rescan);
        // A path already held costs nothing; a new one past the bound becomes a rescan.
        pending.add(Wake::Path(PathBuf::from("/r/a.json")));
        assert!(!pending.rescan);
        pending.add(Wake::Path(PathBuf::from("/r/one-too-many.json")));
        assert!(pending.rescan);
        assert!(pending.paths.is_empty(), "the rescan replaces the paths");
        for i in 0..10 * INBOX_MAX_PATHS {
            pending.add(Wake::Path(PathBuf::from(format!("/r/q{i}.json"))));
        }
        assert!(pending.paths.is_empty(), "a pending rescan holds no paths");
        // A kernel overflow likewise.
        let mut pending = Pending::default();
        pending.add(Wake::Path(PathBuf::from("/r/a.json")));
        pending.add(Wake::Rescan);
        assert!(pending.rescan && pending.paths.is_empty());
    }

    #[test]
    fn the_watch_moves_when_its_directory_leaves_or_returns_and_not_for_a_stale_report() {
        fn number(watch: &DirWatch) -> Option<u64> {
            match watch.on {
                Watch::Dir { number, .. } => Some(number),
                _ => None,
            }
        }
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let mut watch = DirWatch::new(dir.clone(), Arc::new(Inbox::default()), true);
        let first = number(&watch).expect("watching the directory");
        assert!(!watch.refresh(None), "nothing changed");

        // Removed and created again, the directory often has the same inode: the watch's own
        // report that its directory left is what moves it.
        let mut pending = Pending::default();
        pending.add(Wake::Left { watch: first });
        pending.add(Wake::Left { watch: first - 1 });
        assert_eq!(
            pending.left,
            Some(first),
            "the latest watch's report is kept"
        );
        assert!(watch.refresh(pending.left));
        let second = number(&watch).expect("watching the directory");
        assert_ne!(first, second);
        assert!(
            !watch.refresh(Some(first)),
            "a report of a watch already replaced changes nothing"
        );

        std::fs::remove_dir(&dir).unwrap();
        assert!(watch.refresh(None));
        assert!(
            matches!(watch.on, Watch::Parent { .. }),
            "gone: its parent is watched"
        );
        assert!(!watch.refresh(None), "still gone: nothing to move");
        std::fs::create_dir(&dir).unwrap();
        assert!(watch.refresh(None));
        assert!(number(&watch).is_some(), "back: watched again");

        // Replaced by a rename: another directory under the same path.
        let staged = parent.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        std::fs::rename(&staged, &dir).unwrap();
        let before = number(&watch);
        assert!(watch.refresh(None));
        assert!(number(&watch).is_some() && number(&watch) != before);

        // With its parent gone too there is nothing to watch: the periodic rescan checks.
        std::fs::remove_dir_all(parent.path()).unwrap();
        assert!(watch.refresh(None));
        assert!(matches!(watch.on, Watch::Nowhere));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(watch.refresh(None));
        assert!(number(&watch).is_some(), "back: watched again");
    }

    #[tokio::test]
    async fn a_burst_of_1000_files_is_reported_once_each_by_the_watch_while_nobody_reads() {
        const FILES: usize = 1000;
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        // Long rescan: only the watch can report the burst.
        let (mut rx, handle) = watch_dir(
            dir.path().to_path_buf(),
            Duration::from_secs(3600),
            cancel.clone(),
        );
        crate::write_atomic(dir.path(), &file("sentinel")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("sentinel"));
        // Nobody reads while the files are written: the channel (256) fills and the watcher
        // waits, its events held in the inbox.
        let written = tokio::task::spawn_blocking({
            let dir = dir.path().to_path_buf();
            move || {
                for i in 0..FILES {
                    crate::write_atomic(&dir, &file(&format!("p{i}"))).unwrap();
                }
            }
        });
        written.await.unwrap();
        let mut seen = HashSet::new();
        while seen.len() < FILES {
            let event = next(&mut rx).await;
            let id = upserted_id(&event).unwrap_or_else(|| panic!("{event:?}"));
            assert!(seen.insert(id.to_string()), "{id} reported twice");
        }
        assert_quiet(&mut rx).await;

        for i in 0..FILES {
            std::fs::remove_file(dir.path().join(format!("p{i}.json"))).unwrap();
        }
        let mut removed = HashSet::new();
        while removed.len() < FILES {
            match next(&mut rx).await {
                HandoffEvent::Removed { path, .. } => assert!(removed.insert(path)),
                other => panic!("{other:?}"),
            }
        }
        assert_quiet(&mut rx).await;
        cancel.cancel();
        handle.await.unwrap();
    }

    // covers: POOL-3207
    #[tokio::test]
    async fn a_directory_removed_and_created_again_is_watched_again_without_the_periodic_rescan() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let cancel = CancellationToken::new();
        let (mut rx, handle) = watch_dir(dir.clone(), Duration::from_secs(3600), cancel.clone());
        crate::write_atomic(&dir, &file("a")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("a"));

        std::fs::remove_dir_all(&dir).unwrap();
        let removed = next(&mut rx).await;
        assert!(
            matches!(&removed, HandoffEvent::Removed { path, .. } if path.ends_with("a.json")),
            "{removed:?}"
        );

        std::fs::create_dir(&dir).unwrap();
        crate::write_atomic(&dir, &file("b")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("b"));
        // `b` may have come from the rescan that follows a new watch; `c` only from the watch.
        crate::write_atomic(&dir, &file("c")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("c"));
        std::fs::remove_file(dir.join("b.json")).unwrap();
        assert!(
            matches!(next(&mut rx).await, HandoffEvent::Removed { path, .. } if path.ends_with("b.json"))
        );
        assert_quiet(&mut rx).await;
        cancel.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn a_directory_replaced_by_a_rename_is_watched_and_the_one_moved_away_is_not() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let cancel = CancellationToken::new();
        let (mut rx, handle) = watch_dir(dir.clone(), Duration::from_secs(3600), cancel.clone());
        crate::write_atomic(&dir, &file("a")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("a"));

        // A staged directory renamed onto the path, the old one moved aside.
        let staged = parent.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        crate::write_atomic(&staged, &file("s")).unwrap();
        let old = parent.path().join("old");
        std::fs::rename(&dir, &old).unwrap();
        std::fs::rename(&staged, &dir).unwrap();
        let mut events = [next(&mut rx).await, next(&mut rx).await];
        events.sort_by_key(|e| matches!(e, HandoffEvent::Upserted { .. }));
        assert!(
            matches!(&events, [HandoffEvent::Removed { path, .. }, HandoffEvent::Upserted { file, .. }]
                if path.ends_with("a.json") && file.pool_id == "s"),
            "{events:?}"
        );
        crate::write_atomic(&dir, &file("t")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("t"));
        // What happens in the directory moved aside is no longer this path's business.
        crate::write_atomic(&old, &file("z")).unwrap();
        assert_quiet(&mut rx).await;
        cancel.cancel();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn with_its_parent_removed_too_the_directory_is_found_again_within_one_rescan_interval() {
        const RESCAN: Duration = Duration::from_secs(10);
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("p");
        let dir = parent.join("run");
        std::fs::create_dir_all(&dir).unwrap();
        crate::write_atomic(&dir, &file("a")).unwrap();
        let cancel = CancellationToken::new();
        let (mut rx, handle) = watch_dir(dir.clone(), RESCAN, cancel.clone());
        // The first rescan runs at once.
        assert_eq!(upserted_id(&next_within(&mut rx, RESCAN).await), Some("a"));

        // Nothing left to watch: no directory, no parent.
        let removed_at = Instant::now();
        std::fs::remove_dir_all(&parent).unwrap();
        let removed = next_within(&mut rx, RESCAN * 2).await;
        assert!(
            matches!(removed, HandoffEvent::Removed { .. }),
            "{removed:?}"
        );
        assert!(
            removed_at.elapsed() <= RESCAN,
            "removal noticed after {:?}",
            removed_at.elapsed()
        );

        let created_at = Instant::now();
        std::fs::create_dir_all(&dir).unwrap();
        crate::write_atomic(&dir, &file("b")).unwrap();
        assert_eq!(
            upserted_id(&next_within(&mut rx, RESCAN * 2).await),
            Some("b")
        );
        assert!(
            created_at.elapsed() <= RESCAN,
            "new directory noticed after {:?}",
            created_at.elapsed()
        );
        cancel.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn a_relative_directory_is_watched_through_events_too() {
        let dir = tempfile::tempdir().unwrap();
        // The same directory named from the current one: `../../…/tmp/…`.
        let cwd = std::env::current_dir().unwrap();
        let up = cwd.components().count() - 1;
        let relative = std::iter::repeat_n(Path::new(".."), up)
            .collect::<PathBuf>()
            .join(dir.path().strip_prefix("/").unwrap());
        assert!(relative.is_relative());
        let cancel = CancellationToken::new();
        let (mut rx, handle) = watch_dir(relative, Duration::from_secs(3600), cancel.clone());
        crate::write_atomic(dir.path(), &file("sentinel")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("sentinel"));
        crate::write_atomic(dir.path(), &file("a")).unwrap();
        assert_eq!(upserted_id(&next(&mut rx).await), Some("a"));
        cancel.cancel();
        handle.await.unwrap();
    }

    // covers: POOL-3206
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
