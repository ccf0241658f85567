//! Each fault, on real sockets: an echo-like upstream that sends a known stream, the proxy in
//! between, and what the client sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use llorch_fault_proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOOPBACK: &str = "127.0.0.1:0";

/// An upstream that answers every connection with `reply` after reading one chunk, then
/// keeps echoing what it reads until EOF.
async fn upstream(reply: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = conn.read(&mut buf).await else {
                    return;
                };
                if n == 0 || conn.write_all(&reply).await.is_err() {
                    return;
                }
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn proxy_for(reply: &[u8]) -> FaultProxy {
    let up = upstream(reply.to_vec()).await;
    FaultProxy::start(LOOPBACK.parse().unwrap(), up)
        .await
        .unwrap()
}

/// Reads until `n` bytes came or `wait` passed; what came.
async fn read_for(conn: &mut TcpStream, n: usize, wait: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(wait, async {
        while got.len() < n {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(k) => got.extend_from_slice(&buf[..k]),
            }
        }
    })
    .await;
    got
}

#[tokio::test]
async fn pass_carries_both_ways_and_counts_bytes() {
    let p = proxy_for(b"hello").await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    assert_eq!(read_for(&mut c, 5, Duration::from_secs(5)).await, b"hello");
    c.write_all(b"echo").await.unwrap();
    assert_eq!(read_for(&mut c, 4, Duration::from_secs(5)).await, b"echo");
    assert_eq!(p.accepted(), 1);
    assert_eq!(p.upstream_bytes(), 9);
}

#[tokio::test]
async fn stall_after_n_bytes_forwards_exactly_n_then_holds_the_connection_open_until_lifted() {
    let reply: Vec<u8> = (0..100u8).collect();
    let p = proxy_for(&reply).await;
    p.set(Fault::StallAfter(40));
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let got = read_for(&mut c, 100, Duration::from_millis(500)).await;
    assert_eq!(got, reply[..40], "exactly the first 40 bytes");
    assert_eq!(
        p.open(),
        1,
        "the stalled connection is neither closed nor reset"
    );
    p.set(Fault::Pass);
    let rest = read_for(&mut c, 60, Duration::from_secs(5)).await;
    assert_eq!(rest, reply[40..], "the held bytes follow once lifted");
}

#[tokio::test]
async fn reset_sends_rst_to_an_open_connection_and_refuses_new_ones() {
    let p = proxy_for(b"hello").await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    assert_eq!(read_for(&mut c, 5, Duration::from_secs(5)).await, b"hello");
    p.set(Fault::Reset);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()).unwrap_err(),
        std::io::ErrorKind::ConnectionReset,
        "an RST, not a FIN"
    );
    // A new connection is accepted and reset: the RST shows on the write or on the read.
    let mut again = TcpStream::connect(p.addr()).await.unwrap();
    let wrote = again.write_all(b"x").await;
    let read = tokio::time::timeout(Duration::from_secs(5), again.read(&mut buf))
        .await
        .unwrap();
    let reset = |r: &std::io::Result<()>| {
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    };
    assert!(
        reset(&wrote) || reset(&read.map(|_| ())),
        "not reset: write {wrote:?}"
    );
    assert_eq!(p.resets(), 2);
}

#[tokio::test]
async fn half_open_forwards_nothing_and_closes_nothing_then_heals() {
    let p = proxy_for(b"hello").await;
    p.set(Fault::HalfOpen);
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    assert!(read_for(&mut c, 5, Duration::from_millis(300))
        .await
        .is_empty());
    assert_eq!(p.open(), 1);
    p.set(Fault::Pass);
    assert_eq!(read_for(&mut c, 5, Duration::from_secs(5)).await, b"hello");
}

#[tokio::test]
async fn latency_delays_each_chunk_by_at_least_the_setting() {
    let p = proxy_for(b"hello").await;
    p.set(Fault::Latency(Duration::from_millis(150)));
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    let sent = std::time::Instant::now();
    c.write_all(b"x").await.unwrap();
    assert_eq!(read_for(&mut c, 5, Duration::from_secs(5)).await, b"hello");
    // One delay each way: a lower bound, never an upper one.
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test]
async fn bandwidth_spreads_a_reply_over_its_size_divided_by_the_rate() {
    let reply = vec![7u8; 2000];
    let p = proxy_for(&reply).await;
    p.set(Fault::Bandwidth(10_000));
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    let sent = std::time::Instant::now();
    c.write_all(b"x").await.unwrap();
    assert_eq!(read_for(&mut c, 2000, Duration::from_secs(5)).await, reply);
    assert!(
        sent.elapsed() >= Duration::from_millis(200),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test]
async fn a_client_half_close_is_carried_upstream_and_the_reply_still_arrives() {
    let p = proxy_for(b"hello").await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(read_for(&mut c, 5, Duration::from_secs(5)).await, b"hello");
    // The upstream saw EOF and closed: so does the client.
    let mut buf = [0u8; 4];
    let end = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?}");
}

#[test]
fn fault_specs_parse_and_bad_ones_say_what_is_accepted() {
    assert_eq!("stall-after=10".parse::<Fault>(), Ok(Fault::StallAfter(10)));
    assert_eq!(
        "latency=5".parse::<Fault>(),
        Ok(Fault::Latency(Duration::from_millis(5)))
    );
    assert_eq!("half-open".parse::<Fault>(), Ok(Fault::HalfOpen));
    assert!("bandwidth=0".parse::<Fault>().is_err());
    let err = "jitter".parse::<Fault>().unwrap_err();
    assert!(err.contains("stall-after=BYTES"), "{err}");
}
