//! A tiny llama model in GGUF v3, written from scratch: 2 layers, 64-dim, an SPM vocabulary with
//! byte fallback (`<unk> <s> </s>`, 256 byte tokens, then a few hundred word pieces, no
//! duplicates), and random F32 weights from a seeded generator. llama-server loads it and
//! generates (nonsense) text. Same seed → byte-identical file.
//!
//! The output projection gives word pieces random rows and control/byte tokens zero rows, so
//! sampling favours readable word pieces and rarely ends on `</s>`.

use std::collections::BTreeSet;

pub const DEFAULT_SEED: u64 = 0x11a3_a0c4;
const ALIGNMENT: usize = 32;

#[derive(Debug, Clone)]
pub struct TinyModel {
    pub seed: u64,
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_ff: u32,
    pub n_ctx_train: u32,
}

impl TinyModel {
    /// A larger model (384-dim, 6 layers): a few hundred tokens/s on one core, and a prompt
    /// of a few thousand tokens takes seconds to process — for tests that must tell "stopped
    /// early" from "finished", and for measuring what a prompt cache saves.
    pub fn slow(seed: u64) -> Self {
        Self {
            n_embd: 384,
            n_layer: 6,
            n_head: 6,
            n_ff: 1024,
            n_ctx_train: 16384,
            ..Self::with_seed(seed)
        }
    }

    pub fn with_seed(seed: u64) -> Self {
        Self {
            seed,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_ff: 128,
            n_ctx_train: 4096,
        }
    }
}

/// SplitMix64: tiny, fast and fully specified, so the file never depends on a crate's version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }
}

const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_BYTE: i32 = 6;

const WORDS: &str = "the of and to in is was for that on with as by at from his her it an \
were are which be this had not or have but one all their they new has been who more its \
after also two first other would time can there into most when only some over than may \
about out these many such could so people made like then years well world state any \
through part city where both under between them three high during since used while small \
long before around very through each good large year own work place way still early light \
river stone cloud green quiet signal token engine pool queue stream model slot night \
morning garden silver bridge little music winter summer north south east west old young";

/// The vocabulary: (text, score, type). Word pieces carry SPM's `▁` word-start marker.
fn vocabulary() -> Vec<(String, f32, i32)> {
    let mut vocab: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, TOKEN_UNKNOWN),
        ("<s>".into(), 0.0, TOKEN_CONTROL),
        ("</s>".into(), 0.0, TOKEN_CONTROL),
    ];
    for b in 0..=255u8 {
        vocab.push((format!("<0x{b:02X}>"), 0.0, TOKEN_BYTE));
    }
    let mut seen = BTreeSet::new();
    let mut pieces: Vec<String> = Vec::new();
    let mut push = |p: String| {
        if seen.insert(p.clone()) {
            pieces.push(p);
        }
    };
    push("\u{2581}".into());
    for w in WORDS.split_whitespace() {
        push(format!("\u{2581}{w}"));
    }
    for c in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
        push(c.to_string());
    }
    for p in [".", ",", "!", "?", ":", ";", "-", "'", "\""] {
        push(p.into());
    }
    for (rank, p) in pieces.into_iter().enumerate() {
        // Longer, earlier pieces score higher so SPM merges prefer whole words.
        let score = -(rank as f32) / 100.0;
        vocab.push((p, score, TOKEN_NORMAL));
    }
    vocab
}

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn pad_to(&mut self, align: usize) {
        while !self.buf.len().is_multiple_of(align) {
            self.buf.push(0);
        }
    }
}

// GGUF metadata value types.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const GGML_TYPE_F32: u32 = 0;

enum Kv {
    U32(u32),
    F32(f32),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

struct Tensor {
    name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    dims: Vec<u64>,
    data: Vec<f32>,
}

/// Builds the model file's bytes.
pub fn build(m: &TinyModel) -> Vec<u8> {
    let vocab = vocabulary();
    let n_vocab = vocab.len() as u64;
    let n_embd = u64::from(m.n_embd);
    let n_ff = u64::from(m.n_ff);
    let head_dim = m.n_embd / m.n_head;
    let mut rng = SplitMix64(m.seed);

    let kvs: Vec<(&str, Kv)> = vec![
        ("general.architecture", Kv::Str("llama".into())),
        ("general.name", Kv::Str("llorch-tiny".into())),
        ("general.alignment", Kv::U32(ALIGNMENT as u32)),
        ("general.file_type", Kv::U32(0)),
        ("llama.context_length", Kv::U32(m.n_ctx_train)),
        ("llama.embedding_length", Kv::U32(m.n_embd)),
        ("llama.block_count", Kv::U32(m.n_layer)),
        ("llama.feed_forward_length", Kv::U32(m.n_ff)),
        ("llama.rope.dimension_count", Kv::U32(head_dim)),
        ("llama.attention.head_count", Kv::U32(m.n_head)),
        ("llama.attention.head_count_kv", Kv::U32(m.n_head)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
        ("llama.vocab_size", Kv::U32(n_vocab as u32)),
        ("tokenizer.ggml.model", Kv::Str("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Kv::StrArray(vocab.iter().map(|v| v.0.clone()).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Kv::F32Array(vocab.iter().map(|v| v.1).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Kv::I32Array(vocab.iter().map(|v| v.2).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id", Kv::U32(0)),
        ("tokenizer.ggml.bos_token_id", Kv::U32(1)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(2)),
    ];

    let mut random =
        |n: u64, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * scale).collect() };
    let ones = |n: u64| vec![1.0f32; n as usize];
    let w_scale = 1.0 / (n_embd as f32).sqrt();

    let mut tensors = vec![Tensor {
        name: "token_embd.weight".into(),
        dims: vec![n_embd, n_vocab],
        data: random(n_embd * n_vocab, 1.0),
    }];
    for l in 0..m.n_layer {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push(Tensor {
            name: b("attn_norm"),
            dims: vec![n_embd],
            data: ones(n_embd),
        });
        for name in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            tensors.push(Tensor {
                name: b(name),
                dims: vec![n_embd, n_embd],
                data: random(n_embd * n_embd, w_scale),
            });
        }
        tensors.push(Tensor {
            name: b("ffn_norm"),
            dims: vec![n_embd],
            data: ones(n_embd),
        });
        tensors.push(Tensor {
            name: b("ffn_gate"),
            dims: vec![n_embd, n_ff],
            data: random(n_embd * n_ff, w_scale),
        });
        tensors.push(Tensor {
            name: b("ffn_up"),
            dims: vec![n_embd, n_ff],
            data: random(n_embd * n_ff, w_scale),
        });
        tensors.push(Tensor {
            name: b("ffn_down"),
            dims: vec![n_ff, n_embd],
            data: random(n_ff * n_embd, 1.0 / (n_ff as f32).sqrt()),
        });
    }
    tensors.push(Tensor {
        name: "output_norm.weight".into(),
        dims: vec![n_embd],
        data: ones(n_embd),
    });
    let mut output = Vec::with_capacity((n_embd * n_vocab) as usize);
    for (_, _, kind) in &vocab {
        let row = random(n_embd, 0.5);
        if *kind == TOKEN_NORMAL {
            output.extend(row);
        } else {
            output.extend(std::iter::repeat_n(0.0f32, n_embd as usize));
        }
    }
    tensors.push(Tensor {
        name: "output.weight".into(),
        dims: vec![n_embd, n_vocab],
        data: output,
    });

    let mut w = Writer { buf: Vec::new() };
    w.buf.extend_from_slice(b"GGUF");
    w.u32(3);
    w.u64(tensors.len() as u64);
    w.u64(kvs.len() as u64);
    for (key, value) in &kvs {
        w.string(key);
        match value {
            Kv::U32(v) => {
                w.u32(T_U32);
                w.u32(*v);
            }
            Kv::F32(v) => {
                w.u32(T_F32);
                w.f32(*v);
            }
            Kv::Str(s) => {
                w.u32(T_STRING);
                w.string(s);
            }
            Kv::StrArray(items) => {
                w.u32(T_ARRAY);
                w.u32(T_STRING);
                w.u64(items.len() as u64);
                for s in items {
                    w.string(s);
                }
            }
            Kv::F32Array(items) => {
                w.u32(T_ARRAY);
                w.u32(T_F32);
                w.u64(items.len() as u64);
                for v in items {
                    w.f32(*v);
                }
            }
            Kv::I32Array(items) => {
                w.u32(T_ARRAY);
                w.u32(T_I32);
                w.u64(items.len() as u64);
                for v in items {
                    w.i32(*v);
                }
            }
        }
    }
    let mut offset = 0u64;
    for t in &tensors {
        w.string(&t.name);
        w.u32(t.dims.len() as u32);
        for d in &t.dims {
            w.u64(*d);
        }
        w.u32(GGML_TYPE_F32);
        w.u64(offset);
        let size = (t.data.len() * 4) as u64;
        offset += size.div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
    }
    w.pad_to(ALIGNMENT);
    for t in &tensors {
        for v in &t.data {
            w.f32(*v);
        }
        w.pad_to(ALIGNMENT);
    }
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_identical_bytes_and_other_seed_differs() {
        let a = build(&TinyModel::with_seed(7));
        let b = build(&TinyModel::with_seed(7));
        let c = build(&TinyModel::with_seed(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(&a[..4], b"GGUF");
        assert!(
            a.len() > 100_000 && a.len() < 1_000_000,
            "{} bytes",
            a.len()
        );
    }

    #[test]
    fn vocabulary_has_no_duplicates_and_all_byte_tokens() {
        let v = vocabulary();
        let unique: BTreeSet<_> = v.iter().map(|t| t.0.clone()).collect();
        assert_eq!(unique.len(), v.len());
        assert_eq!(v.iter().filter(|t| t.2 == TOKEN_BYTE).count(), 256);
        assert!(v.len() > 300 && v.len() < 1000);
    }
}
