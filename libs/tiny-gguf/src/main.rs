//! `llorch-tiny-model --out FILE [--seed N]`: writes the tiny test model (same seed, same bytes).

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bytes = tiny_gguf::build(&tiny_gguf::TinyModel::with_seed(args.seed));
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
