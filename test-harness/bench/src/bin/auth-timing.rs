//! Does verifying a key take longer when more of it is right? A keyring of `--keys` client
//! keys; three presented tokens (the right one, one wrong in its first byte, one wrong in its
//! last byte) are verified `--rounds` times each, interleaved so drift hits all three alike.
//! Prints each case's median, mean and its standard error, and how far apart the two wrong
//! cases are in standard errors (a timing leak would show as many). Measures only: asserts
//! nothing.

use std::hint::black_box;
use std::time::Instant;

use auth_min::{Keyring, Principal, Role, Token};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    keys: usize,
    #[arg(long, default_value_t = 200_000)]
    rounds: usize,
}

fn secret(i: usize) -> String {
    format!("key-{i:04}-abcdefghijklmnopqrstuvwxyz0123456789")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut ring = Keyring::default();
    for i in 0..args.keys {
        ring.add(
            Principal::new(&format!("client-{i}"), &[Role::Client]),
            Token::new(&secret(i))?,
        )?;
    }
    let right = secret(args.keys / 2);
    let mut first = right.clone().into_bytes();
    first[0] ^= 1;
    let mut last = right.clone().into_bytes();
    let n = last.len() - 1;
    last[n] ^= 1;
    let cases: [(&str, String); 3] = [
        ("right key", right),
        ("wrong first byte", String::from_utf8(first)?),
        ("wrong last byte", String::from_utf8(last)?),
    ];
    let headers: Vec<String> = cases.iter().map(|(_, t)| format!("Bearer {t}")).collect();
    let mut samples: Vec<Vec<f64>> = (0..3).map(|_| Vec::with_capacity(args.rounds)).collect();
    // Warm-up, then interleaved rounds.
    for h in headers.iter().cycle().take(30_000) {
        black_box(ring.identify(Some(h.as_bytes())).is_ok());
    }
    for round in 0..args.rounds {
        for k in 0..3 {
            let c = (round + k) % 3;
            let h = headers[c].as_bytes();
            let t = Instant::now();
            black_box(ring.identify(Some(black_box(h))).is_ok());
            samples[c].push(t.elapsed().as_nanos() as f64);
        }
    }
    println!(
        "{} keys, {} rounds per case; ns per verification",
        args.keys, args.rounds
    );
    println!("| case | median | mean | standard error of the mean |");
    println!("|---|---|---|---|");
    let mut means = Vec::new();
    for ((name, _), s) in cases.iter().zip(&mut samples) {
        s.sort_by(f64::total_cmp);
        let median = s[s.len() / 2];
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (s.len() - 1) as f64;
        let se = (var / s.len() as f64).sqrt();
        means.push((mean, se));
        println!("| {name} | {median:.0} | {mean:.1} | {se:.2} |");
    }
    // A leak would make a nearly right key slower (or faster) than a plainly wrong one. The
    // right key differs from both by what a success costs (the caller learns that anyway).
    let (mf, sf) = means[1];
    let (ml, sl) = means[2];
    println!(
        "wrong first byte vs wrong last byte: {:.1} ns apart, {:.2} standard errors",
        (mf - ml).abs(),
        (mf - ml).abs() / (sf * sf + sl * sl).sqrt()
    );
    Ok(())
}
