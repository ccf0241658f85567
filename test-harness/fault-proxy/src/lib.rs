//! A TCP proxy of the project's own that injects faults between two real processes
//! (orchestratord and an engine, or orchestratord and a node). It forwards bytes as they come;
//! the fault in force is a `watch` value, so changing it acts on open connections too:
//!
//! - [`Fault::Latency`]: every chunk, either way, waits this long before it is forwarded.
//! - [`Fault::Bandwidth`]: at most this many bytes per second, either way.
//! - [`Fault::StallAfter`]: each connection forwards this many bytes from upstream, then
//!   nothing more either way, and stays open (an engine that hangs mid-stream).
//! - [`Fault::Reset`]: every connection is reset (RST), open ones at once, new ones on accept.
//! - [`Fault::HalfOpen`]: nothing is forwarded and nothing is closed (a peer gone without a
//!   FIN: a partition or a host that froze).
//!
//! The proxy never closes the listening socket while it lives: connections reach it and the
//! fault decides their fate, as on a real network.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward as they come.
    Pass,
    /// Delay every chunk, either way, by this long.
    Latency(Duration),
    /// At most this many bytes per second, either way (at least 1).
    Bandwidth(u64),
    /// Forward this many bytes from upstream per connection, then stall (open, silent).
    StallAfter(u64),
    /// Reset every connection, open and new.
    Reset,
    /// Forward nothing, close nothing.
    HalfOpen,
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `pass`, `latency=MS`, `bandwidth=BYTES_PER_S`, `stall-after=BYTES`, `reset`, `half-open`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = match s.trim().split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (s.trim(), None),
        };
        let number = |what: &str| -> Result<u64, String> {
            value
                .ok_or_else(|| format!("{name} needs ={what}"))?
                .parse::<u64>()
                .map_err(|e| format!("{name}: {e}"))
        };
        match name {
            "pass" => Ok(Fault::Pass),
            "latency" => Ok(Fault::Latency(Duration::from_millis(number("MS")?))),
            "bandwidth" => match number("BYTES_PER_S")? {
                0 => Err("bandwidth must be at least 1 byte/s".into()),
                n => Ok(Fault::Bandwidth(n)),
            },
            "stall-after" => Ok(Fault::StallAfter(number("BYTES")?)),
            "reset" => Ok(Fault::Reset),
            "half-open" => Ok(Fault::HalfOpen),
            other => Err(format!(
                "unknown fault {other:?}: one of pass, latency=MS, bandwidth=BYTES_PER_S, stall-after=BYTES, reset, half-open"
            )),
        }
    }
}

/// Counters of what the proxy saw.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
    resets: AtomicU64,
    upstream_bytes: AtomicU64,
}

/// A running proxy; dropping it stops it and closes every connection it carries.
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    counters: Arc<Counters>,
    _tasks: JoinSet<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (fault, rx) = watch::channel(Fault::Pass);
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, upstream, rx, counters.clone()));
        Ok(Self {
            addr,
            fault,
            counters,
            _tasks: tasks,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for a base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Puts `fault` in force, for open connections and new ones.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Connections reset by [`Fault::Reset`] so far.
    pub fn resets(&self) -> u64 {
        self.counters.resets.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from upstream to clients so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.counters.upstream_bytes.load(Ordering::SeqCst)
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    // Connections live in this set: they end when the proxy is dropped.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors, say: wait a little instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                counters.accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(carry(client, upstream, fault.clone(), counters.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Decrements the open count however a connection ends.
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    counters.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(counters.clone());
    // A silent peer: no connection upstream until the fault changes.
    while *fault.borrow_and_update() == Fault::HalfOpen {
        if fault.changed().await.is_err() {
            return;
        }
    }
    if *fault.borrow() == Fault::Reset {
        reset(&client, &counters);
        return;
    }
    let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream));
    let Ok(Ok(server)) = connect.await else {
        // Upstream refused: the client sees a reset, as it would without the proxy.
        reset(&client, &counters);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let carried = Arc::new(AtomicU64::new(0));
    let up = pump(
        client_read,
        server_write,
        fault.clone(),
        carried.clone(),
        None,
    );
    let down = pump(
        server_read,
        client_write,
        fault,
        carried,
        Some(counters.clone()),
    );
    // Both pumps see a reset (each of their waits also watches the fault) and leave without
    // a FIN; an end of stream one way leaves the other way running until it ends too.
    let (up, down) = tokio::join!(up, down);
    if up == End::Reset || down == End::Reset {
        counters.resets.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The reading side ended (EOF or an error); the writing side was shut down.
    Closed,
    /// `Fault::Reset`: both sockets close with RST.
    Reset,
}

/// Forwards one direction under the fault in force. `downstream` (upstream → client) carries
/// the connection's counters; `carried` counts the bytes sent downstream, which
/// `Fault::StallAfter` limits for both directions.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    carried: Arc<AtomicU64>,
    downstream: Option<Arc<Counters>>,
) -> End {
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes read and not yet forwarded (held by a stall or a silent peer).
    let mut pending: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        let now = *fault.borrow_and_update();
        if now == Fault::Reset {
            // SO_LINGER 0 on both sockets, and the write half closes nothing on its own: the
            // sockets close with RST once both pumps have let go, never with a FIN first.
            let _ = AsRef::<TcpStream>::as_ref(&from).set_zero_linger();
            let _ = AsRef::<TcpStream>::as_ref(&to).set_zero_linger();
            to.forget();
            return End::Reset;
        }
        let room = match now {
            Fault::HalfOpen => 0,
            Fault::StallAfter(limit) => limit.saturating_sub(carried.load(Ordering::SeqCst)),
            _ => u64::MAX,
        };
        if !pending.is_empty() && room > 0 {
            let n = pending
                .len()
                .min(usize::try_from(room).unwrap_or(usize::MAX));
            let delay = match now {
                Fault::Latency(d) => d,
                Fault::Bandwidth(bps) => Duration::from_secs_f64(n as f64 / bps.max(1) as f64),
                _ => Duration::ZERO,
            };
            let sent = tokio::select! {
                sent = async {
                    tokio::time::sleep(delay).await;
                    to.write_all(&pending[..n]).await
                } => sent,
                () = until_reset(&mut fault) => continue,
            };
            if sent.is_err() {
                return End::Closed;
            }
            pending.drain(..n);
            if let Some(c) = &downstream {
                carried.fetch_add(n as u64, Ordering::SeqCst);
                c.upstream_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
            continue;
        }
        if pending.is_empty() && eof {
            let _ = to.shutdown().await;
            return End::Closed;
        }
        if room == 0 || eof {
            // Held: wait for another fault.
            if fault.changed().await.is_err() {
                return End::Closed;
            }
            continue;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            },
            changed = fault.changed() => if changed.is_err() { return End::Closed },
        }
    }
}

/// Resolves once the fault is `Reset` (never, if the proxy is gone).
async fn until_reset(fault: &mut watch::Receiver<Fault>) {
    loop {
        if *fault.borrow_and_update() == Fault::Reset {
            return;
        }
        if fault.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn reset(stream: &TcpStream, counters: &Counters) {
    let _ = stream.set_zero_linger();
    counters.resets.fetch_add(1, Ordering::SeqCst);
}
