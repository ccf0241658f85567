//! `llorch-tiny-model --out FILE [--seed N] [--size tiny|prefill]`: writes the tiny test model
//! (same seed and size, same bytes). `prefill` is larger (384-dim, 6 layers): prompt processing
//! takes long enough on a CPU to measure what a prompt cache saves.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Write a tiny random-weight llama GGUF model (deterministic per seed)")]
struct Args {
    /// Output file; written atomically (temporary file + rename).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the weights; the same seed always gives a byte-identical file.
    #[arg(long, default_value_t = tiny_gguf::DEFAULT_SEED)]
    seed: u64,
    /// `tiny` (the test model) or `prefill` (for the cache-aware placement benchmark).
    #[arg(long, default_value = "tiny")]
    size: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = match args.size.as_str() {
        "tiny" => tiny_gguf::TinyModel::with_seed(args.seed),
        "prefill" => tiny_gguf::TinyModel::slow(args.seed),
        other => anyhow::bail!("--size {other:?} is not one of: tiny, prefill"),
    };
    let bytes = tiny_gguf::build(&model);
    let tmp = args.out.with_extension("gguf.tmp");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &args.out)?;
    println!(
        "{} ({} bytes, seed {})",
        args.out.display(),
        bytes.len(),
        args.seed
    );
    Ok(())
}
