//! A model's memory footprint, estimated from its GGUF file before it is loaded (models on
//! demand fit models into a node's memory budget by it): the weights (the file's size: the
//! engine maps them whole), the KV cache for the pool's context (layers × context × the K and
//! V widths × the cache's element size) and the engine's fixed overhead. Only the file's header
//! and metadata are read, with every count and length bounded: a model file is the operator's,
//! but a damaged one must fail with a clear error, not exhaust memory.

use std::io::Read;
use std::path::Path;

/// What the KV-cache estimate needs from a model's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub architecture: String,
    pub block_count: u64,
    pub embedding_length: u64,
    pub head_count: u64,
    pub head_count_kv: u64,
    /// Per-head K and V widths when the model names them (else `embedding_length / head_count`).
    pub key_length: Option<u64>,
    pub value_length: Option<u64>,
}

/// Why a model file's shape could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0} is not a GGUF file")]
    NotGguf(String),
    #[error("{path}: GGUF version {version} is not read here (2 and 3 are)")]
    Version { path: String, version: u32 },
    #[error("{path}: the metadata ends early or is damaged ({what})")]
    Damaged { path: String, what: String },
    #[error("{path}: the metadata has no {key}")]
    Missing { path: String, key: String },
}

/// Metadata entries read at most (real models have a few dozen).
const KV_MAX: u64 = 1 << 16;
/// The longest string read (a key, an architecture name, a vocabulary entry).
const STRING_MAX: u64 = 1 << 20;
/// The most elements of one array (a vocabulary of a few hundred thousand entries).
const ARRAY_MAX: u64 = 1 << 24;

/// Memory an engine takes besides weights and KV cache (its code, compute buffers at the
/// default batch): a fixed allowance, replaced by the measured footprint after a first load.
pub const ENGINE_OVERHEAD_BYTES: u64 = 128 << 20;

/// The estimate of one model at one context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub weights: u64,
    pub kv_cache: u64,
    pub overhead: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.overhead)
    }
}

/// The estimate for `path` loaded with `ctx` tokens of context in all (every slot's share),
/// its KV cache of `kv_element_bytes` per element (2: llama-server's default f16 cache).
pub fn estimate(path: &Path, ctx: u64, kv_element_bytes: u64) -> Result<Estimate, GgufError> {
    let shown = path.display().to_string();
    let weights = std::fs::metadata(path)
        .map_err(|e| GgufError::Io {
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .len();
    let shape = read_shape(path)?;
    let per_head_k = shape
        .key_length
        .unwrap_or(shape.embedding_length / shape.head_count.max(1));
    let per_head_v = shape
        .value_length
        .unwrap_or(shape.embedding_length / shape.head_count.max(1));
    let per_token = shape
        .head_count_kv
        .saturating_mul(per_head_k.saturating_add(per_head_v));
    let kv_cache = shape
        .block_count
        .saturating_mul(ctx)
        .saturating_mul(per_token)
        .saturating_mul(kv_element_bytes);
    Ok(Estimate {
        weights,
        kv_cache,
        overhead: ENGINE_OVERHEAD_BYTES,
    })
}

/// Reads the shape from `path`'s metadata (GGUF v2 or v3).
pub fn read_shape(path: &Path) -> Result<Shape, GgufError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| GgufError::Io {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut r = Reader {
        inner: std::io::BufReader::new(file),
        path: shown.clone(),
    };
    let mut magic = [0u8; 4];
    r.bytes(&mut magic)?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf(shown));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version {
            path: shown,
            version,
        });
    }
    let _tensors = r.u64()?;
    let kv_count = r.u64()?;
    if kv_count > KV_MAX {
        return Err(r.damaged(format!("{kv_count} metadata entries")));
    }
    let mut values: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let kind = r.u32()?;
        let value = r.value(kind)?;
        values.insert(key, value);
    }
    let architecture = match values.get("general.architecture") {
        Some(Value::Str(a)) => a.clone(),
        _ => {
            return Err(GgufError::Missing {
                path: shown,
                key: "general.architecture".into(),
            })
        }
    };
    let int = |key: &str| match values.get(&format!("{architecture}.{key}")) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let need = |key: &str| {
        int(key).ok_or_else(|| GgufError::Missing {
            path: shown.clone(),
            key: format!("{architecture}.{key}"),
        })
    };
    let head_count = need("attention.head_count")?;
    Ok(Shape {
        block_count: need("block_count")?,
        embedding_length: need("embedding_length")?,
        head_count,
        head_count_kv: int("attention.head_count_kv").unwrap_or(head_count),
        key_length: int("attention.key_length"),
        value_length: int("attention.value_length"),
        architecture,
    })
}

/// A metadata value as far as the shape needs it.
enum Value {
    Int(u64),
    Str(String),
    Other,
}

struct Reader<R> {
    inner: R,
    path: String,
}

impl<R: Read> Reader<R> {
    fn damaged(&self, what: String) -> GgufError {
        GgufError::Damaged {
            path: self.path.clone(),
            what,
        }
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        self.inner
            .read_exact(buf)
            .map_err(|e| self.damaged(e.to_string()))
    }

    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| self.damaged(e.to_string()))?;
        if copied < n {
            return Err(self.damaged("the file ends early".into()));
        }
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        let mut b = [0u8; 4];
        self.bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > STRING_MAX {
            return Err(self.damaged(format!("a string of {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.bytes(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The size of a fixed-width GGUF value type (`None`: string or array).
    fn width(kind: u32) -> Option<u64> {
        match kind {
            0 | 1 | 7 => Some(1), // u8, i8, bool
            2 | 3 => Some(2),     // u16, i16
            4..=6 => Some(4),     // u32, i32, f32
            10..=12 => Some(8),   // u64, i64, f64
            _ => None,
        }
    }

    fn value(&mut self, kind: u32) -> Result<Value, GgufError> {
        match kind {
            // Unsigned and signed integers the shape may need; negative ones are nothing.
            0 | 2 | 4 | 10 | 1 | 3 | 5 | 11 => {
                let width = Self::width(kind).unwrap_or(8);
                let mut b = [0u8; 8];
                self.bytes(&mut b[..width as usize])?;
                let n = u64::from_le_bytes(b);
                let negative = matches!(kind, 1 | 3 | 5 | 11) && {
                    let bits = width * 8;
                    (n >> (bits - 1)) & 1 == 1
                };
                Ok(if negative {
                    Value::Other
                } else {
                    Value::Int(n)
                })
            }
            8 => Ok(Value::Str(self.string()?)),
            9 => {
                let elem = self.u32()?;
                let count = self.u64()?;
                if count > ARRAY_MAX {
                    return Err(self.damaged(format!("an array of {count} elements")));
                }
                match Self::width(elem) {
                    Some(w) => self.skip(w * count)?,
                    None if elem == 8 => {
                        for _ in 0..count {
                            let len = self.u64()?;
                            if len > STRING_MAX {
                                return Err(self.damaged(format!("a string of {len} bytes")));
                            }
                            self.skip(len)?;
                        }
                    }
                    None => return Err(self.damaged(format!("an array of type {elem}"))),
                }
                Ok(Value::Other)
            }
            other => match Self::width(other) {
                Some(w) => {
                    self.skip(w)?;
                    Ok(Value::Other)
                }
                None => Err(self.damaged(format!("a value of type {other}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tiny(dir: &Path, model: &tiny_gguf::TinyModel) -> std::path::PathBuf {
        let path = dir.join("m.gguf");
        std::fs::write(&path, tiny_gguf::build(model)).unwrap();
        path
    }

    #[test]
    fn the_shape_and_estimate_of_a_model_come_from_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny_gguf::TinyModel::slow(1);
        let path = tiny(dir.path(), &m);
        let shape = read_shape(&path).unwrap();
        assert_eq!(
            shape,
            Shape {
                architecture: "llama".into(),
                block_count: u64::from(m.n_layer),
                embedding_length: u64::from(m.n_embd),
                head_count: u64::from(m.n_head),
                head_count_kv: u64::from(m.n_head),
                key_length: None,
                value_length: None,
            }
        );
        let e = estimate(&path, 4096, 2).unwrap();
        assert_eq!(e.weights, std::fs::metadata(&path).unwrap().len());
        // 6 layers × 4096 tokens × (6 heads × 64 + 6 × 64) × 2 bytes.
        assert_eq!(e.kv_cache, 6 * 4096 * (6 * 64 * 2) * 2);
        assert_eq!(e.total(), e.weights + e.kv_cache + ENGINE_OVERHEAD_BYTES);
        // Twice the context, twice the cache.
        assert_eq!(estimate(&path, 8192, 2).unwrap().kv_cache, 2 * e.kv_cache);
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny(dir.path(), &tiny_gguf::TinyModel::with_seed(1));
        let whole = std::fs::read(&path).unwrap();
        // Cut inside the metadata.
        std::fs::write(&path, &whole[..200]).unwrap();
        assert!(matches!(read_shape(&path), Err(GgufError::Damaged { .. })));
        // Not GGUF at all.
        std::fs::write(&path, b"PK\x03\x04 a zip file").unwrap();
        assert!(matches!(read_shape(&path), Err(GgufError::NotGguf(_))));
        // A count no model has: refused before anything is allocated for it.
        let mut huge = whole.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        let e = read_shape(&path).unwrap_err().to_string();
        assert!(e.contains("metadata entries"), "{e}");
        // No file.
        let gone = dir.path().join("gone.gguf");
        assert!(matches!(read_shape(&gone), Err(GgufError::Io { .. })));
        assert!(matches!(estimate(&gone, 1, 2), Err(GgufError::Io { .. })));
    }
}
