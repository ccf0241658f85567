//! The admission journal (durable admissions): what a crash of orchestratord must not lose.
//! One seam ([`Journal`]), two implementations: [`NoJournal`] (in memory only: today's
//! behaviour, `ORCHD_JOURNAL=none`) and [`SqliteJournal`] (the default: an embedded SQLite file
//! in WAL mode, one writer thread, group commit).
//!
//! What is written before what it protects:
//! - the admission record (the whole request, its digest, owner, wall-clock times) before the
//!   202 is answered;
//! - the first-token mark before the first `token` frame leaves;
//! - the terminal record (the terminal event) before the terminal frame; the request's prompt
//!   is dropped from the record then (a finished task keeps its digest, not its body).
//!
//! Writes queue to the writer thread; it takes every write waiting, commits them in one
//! transaction and then acknowledges each, so admissions that wait on the same flush share
//! it. At start [`Journal::recover`] returns every record, oldest first, for recovery.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;

/// How long a write may wait for its acknowledgement before the caller gives up on it.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// `ORCHD_JOURNAL_SYNC`: `full` survives power loss (each commit is synced to the disk),
/// `normal` survives a crash of the process (WAL; the disk is synced at checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Full,
    Normal,
}

impl SyncMode {
    pub fn parse(text: &str) -> Result<Self, UnknownSyncMode> {
        match text {
            "full" => Ok(SyncMode::Full),
            "normal" => Ok(SyncMode::Normal),
            other => Err(UnknownSyncMode(other.to_string())),
        }
    }

    fn pragma(self) -> (&'static str, i64) {
        match self {
            SyncMode::Full => ("FULL", 2),
            SyncMode::Normal => ("NORMAL", 1),
        }
    }
}

/// What went wrong with the journal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// It cannot be opened, checked or set up; the message says what to do.
    #[error("{0}")]
    Open(String),
    /// A transaction failed (the disk, the file): none of its writes is durable.
    #[error("journal {path} write failed: {reason}")]
    Write { path: String, reason: String },
    /// More writes wait than the writer has taken (is its disk stalled?): refused at once.
    #[error("the journal has {0} writes waiting (is its disk stalled?)")]
    Backlog(usize),
    /// The writer thread is gone, or the journal was closed.
    #[error("the journal writer stopped")]
    Stopped,
    /// A read (a lookup, compaction) failed.
    #[error("journal read failed: {0}")]
    Read(String),
}

fn read_error(e: rusqlite::Error) -> JournalError {
    JournalError::Read(e.to_string())
}

/// `ORCHD_JOURNAL_SYNC` named no sync mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ORCHD_JOURNAL_SYNC {0:?} is not one of: full, normal")]
pub struct UnknownSyncMode(pub String);

/// An admitted task as the journal keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub task_id: String,
    pub owner: String,
    pub digest: [u8; 32],
    /// The request as submitted (JSON, prompt included).
    pub request: String,
    pub correlation_id: String,
    pub submitted_ms: u64,
    /// The deadline on the wall clock (ms since the epoch), when the request had one.
    pub deadline_ms: Option<u64>,
}

/// A task's end as the journal keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub task_id: String,
    pub owner: String,
    /// The terminal event (`{"type":"end",...}` or `{"type":"error",...}`).
    pub event: String,
    pub tokens_out: u32,
    pub finished_ms: u64,
}

/// One journaled task at recovery (or an idempotency lookup).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub admission: Admission,
    /// The first token left for the client: the task cannot run again.
    pub first_token: bool,
    pub ending: Option<Ending>,
}

/// The durability seam. Writes return a future that resolves once the write is durable (or
/// failed); `none` resolves at once.
pub trait Journal: Send + Sync + 'static {
    /// Whether writes are kept at all (`false` for `none`: nothing to wait for).
    fn durable(&self) -> bool;
    fn admit(&self, admission: Admission) -> BoxFuture<'static, Result<(), JournalError>>;
    /// Task ids are scoped per key: a task is named by its owner and its id.
    fn first_token(
        &self,
        owner: &str,
        task_id: &str,
    ) -> BoxFuture<'static, Result<(), JournalError>>;
    fn end(&self, ending: Ending) -> BoxFuture<'static, Result<(), JournalError>>;
    /// The record of `owner`'s `task_id`, if the journal holds it (idempotency past the
    /// in-memory retention).
    fn lookup(&self, owner: &str, task_id: &str) -> Result<Option<Record>, JournalError>;
    /// Every record, in admission order.
    fn recover(&self) -> Result<Vec<Record>, JournalError>;
    /// How many times the journal was opened before this run (recovered logs are numbered
    /// from it, so ids of every earlier run stay below).
    fn restarts(&self) -> u64;
    /// Forgets a withdrawn admission (the client got a 503 for it): its id is free again.
    fn withdraw(&self, owner: &str, task_id: &str) -> BoxFuture<'static, Result<(), JournalError>>;
    /// Forgets finished tasks older than `forget_before_ms` and, while the file is larger
    /// than `max_bytes`, the oldest finished ones; resolves to how many were forgotten.
    fn compact(
        &self,
        forget_before_ms: u64,
        max_bytes: u64,
    ) -> BoxFuture<'static, Result<u64, JournalError>>;
}

/// `ORCHD_JOURNAL=none`: nothing survives the process.
pub struct NoJournal;

impl Journal for NoJournal {
    fn durable(&self) -> bool {
        false
    }
    fn admit(&self, _: Admission) -> BoxFuture<'static, Result<(), JournalError>> {
        async { Ok(()) }.boxed()
    }
    fn first_token(&self, _: &str, _: &str) -> BoxFuture<'static, Result<(), JournalError>> {
        async { Ok(()) }.boxed()
    }
    fn end(&self, _: Ending) -> BoxFuture<'static, Result<(), JournalError>> {
        async { Ok(()) }.boxed()
    }
    fn lookup(&self, _: &str, _: &str) -> Result<Option<Record>, JournalError> {
        Ok(None)
    }
    fn recover(&self) -> Result<Vec<Record>, JournalError> {
        Ok(Vec::new())
    }
    fn restarts(&self) -> u64 {
        0
    }
    fn withdraw(&self, _: &str, _: &str) -> BoxFuture<'static, Result<(), JournalError>> {
        async { Ok(()) }.boxed()
    }
    fn compact(&self, _: u64, _: u64) -> BoxFuture<'static, Result<u64, JournalError>> {
        async { Ok(0) }.boxed()
    }
}

type Ack = tokio::sync::oneshot::Sender<Result<(), JournalError>>;

/// A task as the journal names it: its owner and its id.
type Named = (String, String);

enum Write {
    Admit(Admission),
    FirstToken(Named),
    End(Ending),
    Withdraw(Named),
}

/// What the writer thread is asked: writes (batched into one transaction), or a compaction
/// (after the batch it came with, in short transactions of its own).
enum Job {
    Write(Write, Ack),
    Compact {
        before_ms: u64,
        max_bytes: u64,
        done: tokio::sync::oneshot::Sender<Result<u64, JournalError>>,
    },
}

/// Writes waiting for the writer at most; beyond, a write fails at once (a stalled disk
/// must not hold every admission's request in memory).
const QUEUE_MAX: usize = 8192;

/// The SQLite journal: one file in the data directory, opened exclusively (a second
/// orchestratord on the same directory is refused).
pub struct SqliteJournal {
    path: PathBuf,
    /// Held while the journal is open: one orchestratord per data directory.
    _lock: std::fs::File,
    writes: Mutex<Option<mpsc::SyncSender<Job>>>,
    restarts: u64,
    /// Reads (lookups, recovery, compaction) on their own connection.
    reader: Mutex<rusqlite::Connection>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Transactions committed (each holds every write that was waiting).
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The most writes one transaction takes.
const BATCH_MAX: usize = 512;

/// The tasks table, created as `$name` (one definition for the schema and its migration).
macro_rules! tasks_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    digest BLOB NOT NULL,
    request TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    submitted_ms INTEGER NOT NULL,
    deadline_ms INTEGER,
    first_token INTEGER NOT NULL DEFAULT 0,
    ending TEXT,
    tokens_out INTEGER,
    finished_ms INTEGER,
    UNIQUE (owner, task_id)
);
"
        )
    };
}

const SCHEMA: &str = concat!(
    tasks_table!("IF NOT EXISTS tasks"),
    "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_ms) WHERE finished_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"
);

/// 2: task ids are unique per owner (1: across owners).
const SCHEMA_VERSION: &str = "2";

/// Schema 1 to 2: the same rows in a table whose ids are unique per owner (a constraint
/// SQLite cannot change in place).
const MIGRATE_1_TO_2: &str = concat!(
    "BEGIN IMMEDIATE;\n",
    tasks_table!("tasks_v2"),
    "INSERT INTO tasks_v2 SELECT seq, task_id, owner, digest, request, correlation_id, submitted_ms, deadline_ms, first_token, ending, tokens_out, finished_ms FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_v2 RENAME TO tasks;
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_ms) WHERE finished_ms IS NOT NULL;
UPDATE meta SET value = '2' WHERE key = 'schema';
COMMIT;
"
);

fn open_error(path: &Path, what: &str, e: impl std::fmt::Display) -> JournalError {
    JournalError::Open(format!(
        "journal {}: {what}: {e}. If the file is damaged, move it aside (the tasks it holds are then lost; docs/runbooks/journal.md) or restore a backup",
        path.display()
    ))
}

fn connection(path: &Path, sync: SyncMode) -> Result<rusqlite::Connection, JournalError> {
    let conn = rusqlite::Connection::open(path).map_err(|e| open_error(path, "cannot open", e))?;
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(|e| open_error(path, "cannot configure", e))?;
    // Before WAL, which writes the file's first page: a new file takes it only then.
    conn.execute_batch("PRAGMA auto_vacuum=INCREMENTAL;")
        .map_err(|e| open_error(path, "cannot configure", e))?;
    // A prompt dropped at a task's end (or a withdrawn task) is overwritten on disk, not just
    // unlinked from its page: the file keeps no input of a finished task.
    let secure: i64 = conn
        .query_row("PRAGMA secure_delete=ON", [], |r| r.get(0))
        .map_err(|e| open_error(path, "cannot set secure_delete", e))?;
    if secure != 1 {
        return Err(open_error(path, "secure_delete refused", secure));
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| open_error(path, "cannot switch to WAL", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_error(path, "WAL mode refused", mode));
    }
    let (name, value) = sync.pragma();
    conn.execute_batch(&format!("PRAGMA synchronous={name};"))
        .map_err(|e| open_error(path, "cannot set synchronous", e))?;
    // Read back: a setting that did not take is refused rather than trusted.
    let got: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .map_err(|e| open_error(path, "cannot read synchronous", e))?;
    if got != value {
        return Err(open_error(
            path,
            "synchronous did not take",
            format!("asked {name}, got {got}"),
        ));
    }
    Ok(conn)
}

impl SqliteJournal {
    /// Opens (or creates) `dir/journal.sqlite3`: checks it (a damaged file refuses start with
    /// what to do), sets WAL and the sync mode (read back), and starts the writer thread.
    pub fn open(dir: &Path, sync: SyncMode) -> Result<Self, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            JournalError::Open(format!(
                "cannot create the data directory {} (ORCHD_DATA_DIR): {e}",
                dir.display()
            ))
        })?;
        // The journal holds prompts until their tasks end: readable by this user only.
        restrict(dir)?;
        let path = dir.join("journal.sqlite3");
        let lock = take_lock(&dir.join("journal.lock"))?;
        // Created 0600 before SQLite opens it: SQLite gives its WAL and shared-memory files
        // the database file's mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| open_error(&path, "cannot create", e))?;
        }
        let writer = connection(&path, sync)?;
        let check: String = writer
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| open_error(&path, "cannot be checked", e))?;
        if check != "ok" {
            return Err(open_error(&path, "is damaged", check));
        }
        writer
            .execute_batch(SCHEMA)
            .map_err(|e| open_error(&path, "cannot create its tables", e))?;
        let version: Option<String> = writer
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(|e| open_error(&path, "cannot read its schema version", e))?;
        match version.as_deref() {
            None => {
                writer
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                        [SCHEMA_VERSION],
                    )
                    .map_err(|e| open_error(&path, "cannot write its schema version", e))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some("1") => {
                writer
                    .execute_batch(MIGRATE_1_TO_2)
                    .map_err(|e| open_error(&path, "cannot move to schema 2", e))?;
                tracing::info!(path = %path.display(), "journal moved to schema 2 (task ids unique per key)");
            }
            Some(other) => {
                return Err(open_error(
                    &path,
                    "was written by another version",
                    format!("schema {other}, this build reads {SCHEMA_VERSION}"),
                ))
            }
        }
        let restarts: u64 = writer
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'opened'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(0),
                e => Err(e),
            })
            .map_err(|e| open_error(&path, "cannot read its open count", e))?;
        writer
            .execute(
                "INSERT INTO meta (key, value) VALUES ('opened', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(restarts + 1).to_string()],
            )
            .map_err(|e| open_error(&path, "cannot write its open count", e))?;
        let reader = connection(&path, sync)?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_MAX);
        let shown = path.clone();
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = commits.clone();
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || write_loop(writer, rx, &shown, &counted))
            .map_err(|e| JournalError::Open(format!("cannot start the journal writer: {e}")))?;
        Ok(Self {
            path,
            _lock: lock,
            restarts,
            writes: Mutex::new(Some(tx)),
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(handle)),
            commits,
        })
    }

    /// Transactions committed so far (each holds every write that was waiting).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The sync level in force (SQLite's number: 2 full, 1 normal), read back.
    #[cfg(test)]
    fn synchronous(&self) -> Result<i64, rusqlite::Error> {
        self.reader
            .lock()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, write: Write) -> BoxFuture<'static, Result<(), JournalError>> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let sent = self.submit(Job::Write(write, ack));
        async move {
            sent?;
            done.await.unwrap_or(Err(JournalError::Stopped))
        }
        .boxed()
    }

    fn submit(&self, job: Job) -> Result<(), JournalError> {
        match &*self.writes.lock() {
            Some(tx) => tx.try_send(job).map_err(|e| match e {
                mpsc::TrySendError::Full(_) => JournalError::Backlog(QUEUE_MAX),
                mpsc::TrySendError::Disconnected(_) => JournalError::Stopped,
            }),
            None => Err(JournalError::Stopped),
        }
    }

    /// Stops the writer after the writes already queued (shutdown).
    pub fn close(&self) {
        self.writes.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for SqliteJournal {
    fn drop(&mut self) {
        self.close();
    }
}

/// Makes the data directory this user's alone (0700) when group or others may enter it.
fn restrict(dir: &Path) -> Result<(), JournalError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir)
        .map_err(|e| JournalError::Open(format!("cannot read {}: {e}", dir.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            JournalError::Open(format!(
                "the data directory {} is open to group or others and cannot be restricted to 0700: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// One orchestratord per data directory: an exclusive lock on a lock file, held as long as
/// the journal is open (the kernel drops it when the process ends, however it ends).
fn take_lock(path: &Path) -> Result<std::fs::File, JournalError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| JournalError::Open(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Open(format!(
            "the data directory {} is in use by another orchestratord (it holds {})",
            path.parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(JournalError::Open(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

fn write_loop(
    mut conn: rusqlite::Connection,
    rx: mpsc::Receiver<Job>,
    path: &Path,
    commits: &std::sync::atomic::AtomicU64,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut batch = Vec::new();
        let mut compactions = Vec::new();
        for job in jobs {
            match job {
                Job::Write(w, ack) => batch.push((w, ack)),
                Job::Compact {
                    before_ms,
                    max_bytes,
                    done,
                } => compactions.push((before_ms, max_bytes, done)),
            }
        }
        if !batch.is_empty() {
            let result = apply(&mut conn, &batch);
            if result.is_ok() {
                commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            let result = result.map_err(|e| {
                let error = JournalError::Write {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                };
                tracing::error!(%error, writes = batch.len(), "journal write failed");
                error
            });
            for (_, ack) in batch {
                let _ = ack.send(result.clone());
            }
        }
        for (before_ms, max_bytes, done) in compactions {
            let _ = done.send(
                compact(&conn, before_ms, max_bytes).map_err(|e| JournalError::Read(e.to_string())),
            );
        }
    }
}

fn apply(conn: &mut rusqlite::Connection, batch: &[(Write, Ack)]) -> rusqlite::Result<()> {
    // Statements are prepared once per connection (SQLite's parse and plan of each statement
    // cost more than the write itself on this path: three writes per task).
    let tx = conn.transaction()?;
    for (write, _) in batch {
        match write {
            Write::Admit(a) => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO tasks (task_id, owner, digest, request, correlation_id, submitted_ms, deadline_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(rusqlite::params![
                    a.task_id,
                    a.owner,
                    &a.digest[..],
                    a.request,
                    a.correlation_id,
                    clamp_ms(a.submitted_ms),
                    a.deadline_ms.map(clamp_ms),
                ])?;
            }
            Write::FirstToken((owner, id)) => {
                tx.prepare_cached(
                    "UPDATE tasks SET first_token = 1 WHERE owner = ?1 AND task_id = ?2",
                )?
                .execute([owner, id])?;
            }
            Write::End(e) => {
                // The first ending wins; the prompt goes (the digest answers resubmissions).
                tx.prepare_cached(
                    "UPDATE tasks SET ending = ?2, tokens_out = ?3, finished_ms = ?4, request = json_remove(request, '$.prompt') WHERE task_id = ?1 AND owner = ?5 AND ending IS NULL",
                )?
                .execute(rusqlite::params![
                    e.task_id,
                    e.event,
                    i64::from(e.tokens_out),
                    clamp_ms(e.finished_ms),
                    e.owner,
                ])?;
            }
            Write::Withdraw((owner, id)) => {
                tx.prepare_cached("DELETE FROM tasks WHERE owner = ?1 AND task_id = ?2")?
                    .execute([owner, id])?;
            }
        }
    }
    tx.commit()
}

/// A time in ms as SQLite's signed integer (far-future values saturate).
fn clamp_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Finished tasks before `before_ms`, then the oldest finished ones while the live pages
/// exceed `max_bytes`; in transactions of at most 1000 rows, so writes waiting behind are
/// held briefly; the WAL is checkpointed without waiting for readers.
fn compact(conn: &rusqlite::Connection, before_ms: u64, max_bytes: u64) -> rusqlite::Result<u64> {
    let mut forgotten = 0u64;
    loop {
        let n = conn.execute(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE finished_ms IS NOT NULL AND finished_ms < ?1 LIMIT 1000)",
            [clamp_ms(before_ms)],
        )? as u64;
        forgotten += n;
        if n < 1000 {
            break;
        }
    }
    let size = |conn: &rusqlite::Connection| -> rusqlite::Result<u64> {
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(((pages - free).max(0) * page) as u64)
    };
    // Over the bound: the oldest finished tasks go, a tenth at a time (at most 1000 rows).
    for _ in 0..100 {
        if size(conn)? <= max_bytes {
            break;
        }
        let n = conn.execute(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE finished_ms IS NOT NULL ORDER BY seq LIMIT MIN(1000, MAX(1, (SELECT COUNT(*) FROM tasks WHERE finished_ms IS NOT NULL) / 10)))",
            [],
        )? as u64;
        if n == 0 {
            break;
        }
        forgotten += n;
    }
    if forgotten > 0 {
        conn.execute_batch("PRAGMA incremental_vacuum;")?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    }
    Ok(forgotten)
}

const SELECT: &str = "SELECT task_id, owner, digest, request, correlation_id, submitted_ms, deadline_ms, first_token, ending, tokens_out, finished_ms FROM tasks";

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let digest: Vec<u8> = row.get(2)?;
    let mut d = [0u8; 32];
    if digest.len() == 32 {
        d.copy_from_slice(&digest);
    }
    let ending: Option<String> = row.get(8)?;
    let task_id: String = row.get(0)?;
    let owner: String = row.get(1)?;
    Ok(Record {
        admission: Admission {
            task_id: task_id.clone(),
            owner: owner.clone(),
            digest: d,
            request: row.get(3)?,
            correlation_id: row.get(4)?,
            submitted_ms: row.get::<_, i64>(5)?.max(0) as u64,
            deadline_ms: row.get::<_, Option<i64>>(6)?.map(|d| d.max(0) as u64),
        },
        first_token: row.get::<_, i64>(7)? != 0,
        ending: match ending {
            Some(event) => Some(Ending {
                task_id,
                owner,
                event,
                tokens_out: row
                    .get::<_, Option<i64>>(9)?
                    .unwrap_or(0)
                    .clamp(0, i64::from(u32::MAX)) as u32,
                finished_ms: row.get::<_, Option<i64>>(10)?.unwrap_or(0).max(0) as u64,
            }),
            None => None,
        },
    })
}

impl Journal for SqliteJournal {
    fn durable(&self) -> bool {
        true
    }

    fn admit(&self, admission: Admission) -> BoxFuture<'static, Result<(), JournalError>> {
        self.send(Write::Admit(admission))
    }

    fn first_token(
        &self,
        owner: &str,
        task_id: &str,
    ) -> BoxFuture<'static, Result<(), JournalError>> {
        self.send(Write::FirstToken((owner.to_string(), task_id.to_string())))
    }

    fn end(&self, ending: Ending) -> BoxFuture<'static, Result<(), JournalError>> {
        self.send(Write::End(ending))
    }

    fn lookup(&self, owner: &str, task_id: &str) -> Result<Option<Record>, JournalError> {
        let conn = self.reader.lock();
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT} WHERE owner = ?1 AND task_id = ?2"))
            .map_err(read_error)?;
        let mut rows = stmt.query([owner, task_id]).map_err(read_error)?;
        match rows.next().map_err(read_error)? {
            Some(row) => record(row).map(Some).map_err(read_error),
            None => Ok(None),
        }
    }

    fn recover(&self) -> Result<Vec<Record>, JournalError> {
        let conn = self.reader.lock();
        let mut stmt = conn
            .prepare(&format!("{SELECT} ORDER BY seq"))
            .map_err(|e| open_error(&self.path, "cannot be read", e))?;
        let rows = stmt
            .query_map([], record)
            .map_err(|e| open_error(&self.path, "cannot be read", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| open_error(&self.path, "cannot be read", e))
    }

    fn restarts(&self) -> u64 {
        self.restarts
    }

    fn withdraw(&self, owner: &str, task_id: &str) -> BoxFuture<'static, Result<(), JournalError>> {
        self.send(Write::Withdraw((owner.to_string(), task_id.to_string())))
    }

    fn compact(
        &self,
        forget_before_ms: u64,
        max_bytes: u64,
    ) -> BoxFuture<'static, Result<u64, JournalError>> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let sent = self.submit(Job::Compact {
            before_ms: forget_before_ms,
            max_bytes,
            done,
        });
        async move {
            sent?;
            answer.await.unwrap_or(Err(JournalError::Stopped))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn admission(id: &str, prompt: &str) -> Admission {
        Admission {
            task_id: id.into(),
            owner: "alice".into(),
            digest: [7; 32],
            request: serde_json::json!({"task_id": id, "model_ref": "tiny", "prompt": prompt, "max_tokens": 4}).to_string(),
            correlation_id: format!("c-{id}"),
            submitted_ms: 1000,
            deadline_ms: Some(5000),
        }
    }

    fn ending(id: &str, finished_ms: u64) -> Ending {
        Ending {
            task_id: id.into(),
            owner: "alice".into(),
            event: r#"{"event":"end","data":{"tokens_out":3,"decode_time_ms":1}}"#.into(),
            tokens_out: 3,
            finished_ms,
        }
    }

    // covers: ORCH-2405
    #[tokio::test]
    async fn records_are_read_back_in_admission_order_after_reopening_and_endings_drop_the_prompt()
    {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
            for id in ["a", "b", "c"] {
                j.admit(admission(id, "secret prompt")).await.unwrap();
            }
            j.first_token("alice", "b").await.unwrap();
            j.end(ending("c", 2000)).await.unwrap();
            // A second ending of the same task does not replace the first.
            let mut other = ending("c", 3000);
            other.event = "{}".into();
            j.end(other).await.unwrap();
        }
        let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
        let got = j.recover().unwrap();
        let ids: Vec<_> = got.iter().map(|r| r.admission.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(
            got[0],
            Record {
                admission: admission("a", "secret prompt"),
                first_token: false,
                ending: None
            }
        );
        assert!(got[1].first_token && got[1].ending.is_none());
        assert_eq!(got[2].ending, Some(ending("c", 2000)));
        assert!(!got[2].admission.request.contains("secret prompt"));
        assert!(got[2].admission.request.contains("\"model_ref\":\"tiny\""));
        assert_eq!(
            j.lookup("alice", "b").unwrap().map(|r| r.first_token),
            Some(true)
        );
        assert_eq!(j.lookup("alice", "zzz").unwrap(), None);
        assert_eq!(
            j.lookup("bob", "b").unwrap(),
            None,
            "ids are scoped per key"
        );
    }

    // covers: AUTH-5120
    #[tokio::test]
    async fn two_keys_journal_one_task_id_apart() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
        let bobs = Admission {
            owner: "bob".into(),
            ..admission("same", "bob's prompt")
        };
        j.admit(admission("same", "alice's prompt")).await.unwrap();
        j.admit(bobs.clone()).await.unwrap();
        j.first_token("bob", "same").await.unwrap();
        j.end(ending("same", 2000)).await.unwrap();
        let alice = j.lookup("alice", "same").unwrap().unwrap();
        let bob = j.lookup("bob", "same").unwrap().unwrap();
        assert!(alice.ending.is_some() && !alice.first_token);
        assert!(bob.ending.is_none() && bob.first_token);
        assert_eq!(bob.admission, bobs);
        j.withdraw("bob", "same").await.unwrap();
        assert!(j.lookup("bob", "same").unwrap().is_none());
        assert!(j.lookup("alice", "same").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_schema_1_journal_is_moved_to_ids_scoped_per_key_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Schema 1 as an earlier build wrote it: ids unique across keys.
            let conn = rusqlite::Connection::open(dir.path().join("journal.sqlite3")).unwrap();
            conn.execute_batch(
                "CREATE TABLE tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, digest BLOB NOT NULL, request TEXT NOT NULL, correlation_id TEXT NOT NULL, submitted_ms INTEGER NOT NULL, deadline_ms INTEGER, first_token INTEGER NOT NULL DEFAULT 0, ending TEXT, tokens_out INTEGER, finished_ms INTEGER);
                 CREATE INDEX tasks_finished ON tasks (finished_ms) WHERE finished_ms IS NOT NULL;
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('schema', '1');
                 INSERT INTO tasks (task_id, owner, digest, request, correlation_id, submitted_ms, first_token) VALUES ('old', 'alice', x'07', '{}', 'c', 5, 1);",
            )
            .unwrap();
        }
        let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
        let old = j.lookup("alice", "old").unwrap().unwrap();
        assert!(old.first_token);
        assert_eq!(old.admission.submitted_ms, 5);
        // Another key may now use the id.
        j.admit(Admission {
            owner: "bob".into(),
            ..admission("old", "p")
        })
        .await
        .unwrap();
        assert!(j.lookup("bob", "old").unwrap().is_some());
        drop(j);
        // Opened again: schema 2, nothing to move.
        let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
        assert_eq!(j.recover().unwrap().len(), 2);
    }

    // covers: ORCH-2416
    #[tokio::test]
    async fn a_finished_tasks_prompt_is_gone_from_every_file_of_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let prompt = "the-secret-prompt-of-a-finished-task";
        {
            let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
            for id in ["a", "b"] {
                j.admit(admission(id, prompt)).await.unwrap();
            }
            j.end(ending("a", 2000)).await.unwrap();
            j.withdraw("alice", "b").await.unwrap();
        }
        let mut files = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                files += 1;
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(prompt.len()).any(|w| w == prompt.as_bytes()),
                    "{path:?} still holds the prompt"
                );
            }
        }
        assert!(files > 0);
    }

    // covers: ORCH-2406
    #[tokio::test]
    async fn writes_waiting_together_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
        let pending: Vec<_> = (0..200)
            .map(|k| j.admit(admission(&format!("t{k}"), "p")))
            .collect();
        for p in pending {
            p.await.unwrap();
        }
        assert_eq!(j.recover().unwrap().len(), 200);
        let commits = j.commits();
        assert!(
            (1..100).contains(&commits),
            "{commits} commits for 200 writes"
        );
    }

    // covers: ORCH-2407
    #[test]
    fn the_sync_mode_is_read_back_and_a_second_orchestratord_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(dir.path(), SyncMode::Normal).unwrap();
        assert_eq!(j.synchronous().unwrap(), 1);
        let e = SqliteJournal::open(dir.path(), SyncMode::Normal)
            .err()
            .unwrap();
        assert!(matches!(e, JournalError::Open(_)), "{e:?}");
        assert!(
            e.to_string().contains("in use by another orchestratord"),
            "{e}"
        );
        drop(j);
        let j = SqliteJournal::open(dir.path(), SyncMode::Full).unwrap();
        assert_eq!(j.synchronous().unwrap(), 2);
    }

    // covers: ORCH-2408
    #[tokio::test]
    async fn the_journal_and_its_directory_are_readable_by_this_user_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let j = SqliteJournal::open(&data, SyncMode::Normal).unwrap();
        j.admit(admission("a", "a prompt")).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("journal.sqlite3")), 0o600);
        assert_eq!(mode(&data.join("journal.sqlite3-wal")), 0o600);
    }

    // covers: ORCH-2408
    #[test]
    fn a_damaged_file_refuses_start_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.sqlite3"), vec![0x5a; 8192]).unwrap();
        let e = SqliteJournal::open(dir.path(), SyncMode::Full)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("journal.sqlite3"), "{e}");
        assert!(e.contains("move it aside"), "{e}");
    }

    // covers: ORCH-2409
    #[tokio::test]
    async fn compaction_forgets_old_finished_tasks_then_the_oldest_beyond_the_bound_never_unfinished(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(dir.path(), SyncMode::Normal).unwrap();
        let big = "x".repeat(4000);
        for k in 0..400u64 {
            let id = format!("t{k:03}");
            j.admit(admission(&id, &big)).await.unwrap();
            if k < 390 {
                let mut e = ending(&id, 10_000 + k);
                e.event = format!("{{\"pad\":\"{big}\"}}");
                j.end(e).await.unwrap();
            }
        }
        // Past the window: the first 100 finished.
        assert_eq!(j.compact(10_100, u64::MAX).await.unwrap(), 100);
        assert!(j.lookup("alice", "t099").unwrap().is_none());
        assert!(j.lookup("alice", "t100").unwrap().is_some());
        // Over the bound: the oldest finished go until it fits; unfinished stay.
        let n = j.compact(0, 256 * 1024).await.unwrap();
        assert!(n > 0);
        let left = j.recover().unwrap();
        for k in 390..400u64 {
            assert!(left
                .iter()
                .any(|r| r.admission.task_id == format!("t{k:03}")));
        }
        let oldest_left = left
            .iter()
            .find(|r| r.ending.is_some())
            .map(|r| r.admission.task_id.clone());
        let newest_gone = (100..390u64)
            .map(|k| format!("t{k:03}"))
            .rfind(|id| !left.iter().any(|r| &r.admission.task_id == id));
        assert!(oldest_left > newest_gone, "older finished tasks went first");
    }
}
