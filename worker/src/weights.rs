//! Where weights come from: Hugging Face safetensors checkpoints (one file or sharded with
//! `model.safetensors.index.json`), memory-mapped and read tensor by tensor, or deterministic
//! random weights (`--load-format dummy`) for any config.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::backend::DType;
use crate::error::{EngineError, Result};

/// A tensor in host memory, borrowed from a mapped checkpoint where possible.
#[derive(Debug)]
pub struct HostTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Little-endian elements, row-major.
    pub data: Cow<'a, [u8]>,
}

/// Which part of a tensor a rank loads: all of it, one of `world` equal slices along `dim`,
/// or rows `start..start + len` along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shard {
    Full,
    Slice { dim: usize, rank: usize, world: usize },
    Range { dim: usize, start: usize, len: usize },
}

impl Shard {
    /// The `(dim, start, len)` this shard selects from a tensor of `shape`.
    fn range(self, shape: &[usize]) -> Result<Option<(usize, usize, usize)>> {
        let (dim, start, len) = match self {
            Shard::Full => return Ok(None),
            Shard::Slice { dim, rank, world } => {
                if dim >= shape.len() || world == 0 || !shape[dim].is_multiple_of(world) || rank >= world {
                    return Err(EngineError::Backend(format!(
                        "cannot split dim {dim} of shape {shape:?} into {world} slices (rank {rank})"
                    )));
                }
                let part = shape[dim] / world;
                (dim, rank * part, part)
            }
            Shard::Range { dim, start, len } => (dim, start, len),
        };
        if dim >= shape.len() || start + len > shape[dim] {
            return Err(EngineError::Backend(format!("rows {start}..{} of dim {dim} are outside shape {shape:?}", start + len)));
        }
        Ok(Some((dim, start, len)))
    }
}

struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorEntry>,
}

/// A memory-mapped safetensors checkpoint.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| EngineError::Io { path: index_path.clone(), source })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::Checkpoint { path: index_path.clone(), message: e.to_string() })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| EngineError::Checkpoint {
                path: index_path.clone(),
                message: "no `weight_map` object".into(),
            })?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            names.sort();
            names.dedup();
            names
        } else {
            vec!["model.safetensors".to_owned()]
        };
        let mut files = Vec::with_capacity(file_names.len());
        let mut index = HashMap::new();
        for name in file_names {
            let file = MappedFile::open(&dir.join(&name))?;
            for tensor in file.tensors.keys() {
                index.insert(tensor.clone(), files.len());
            }
            files.push(file);
        }
        Ok(Checkpoint { dir: dir.to_owned(), files, index })
    }

    /// Reads tensor `name`, checking it has `shape`, and returns the requested shard of it.
    pub fn tensor(&self, name: &str, shape: &[usize], shard: Shard) -> Result<HostTensor<'_>> {
        let file = self
            .index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| EngineError::MissingTensor { name: name.to_owned(), dir: self.dir.clone() })?;
        let entry = &file.tensors[name];
        if entry.shape != shape {
            return Err(EngineError::TensorShape {
                path: file.path.clone(),
                name: name.to_owned(),
                found: entry.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let bytes = &file.mmap[entry.start..entry.end];
        slice_host(entry.dtype, shape, bytes, shard)
    }
}

/// Applies `shard` to a full tensor's bytes: a borrowed range for dim 0, a copy otherwise.
fn slice_host<'a>(dtype: DType, shape: &[usize], bytes: &'a [u8], shard: Shard) -> Result<HostTensor<'a>> {
    let Some((dim, start, len)) = shard.range(shape)? else {
        return Ok(HostTensor { dtype, shape: shape.to_vec(), data: Cow::Borrowed(bytes) });
    };
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * dtype.size_in_bytes();
    let mut out_shape = shape.to_vec();
    out_shape[dim] = len;
    let row = shape[dim] * inner;
    let (lo, hi) = (start * inner, (start + len) * inner);
    let data = if outer == 1 {
        Cow::Borrowed(&bytes[lo..hi])
    } else {
        let mut v = Vec::with_capacity(outer * (hi - lo));
        for o in 0..outer {
            v.extend_from_slice(&bytes[o * row + lo..o * row + hi]);
        }
        Cow::Owned(v)
    };
    Ok(HostTensor { dtype, shape: out_shape, data })
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::Io { path: path.to_owned(), source };
        let bad = |message: String| EngineError::Checkpoint { path: path.to_owned(), message };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; a checkpoint modified while mapped is outside
        // the contract (as for every safetensors reader), and bounds are checked below.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        if mmap.len() < 8 {
            return Err(bad(format!("file is {} bytes, too short for a header", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        let data_start = 8usize
            .checked_add(header_len)
            .filter(|&e| e <= mmap.len())
            .ok_or_else(|| bad(format!("header of {header_len} bytes runs past the end of the file (truncated?)")))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_len = mmap.len() - data_start;
        let mut tensors = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(&name, &info, data_start, data_len).map_err(|m| match m {
                EntryProblem::Dtype(dtype) => {
                    EngineError::TensorDtype { path: path.to_owned(), name: name.clone(), dtype }
                }
                EntryProblem::Invalid(message) => bad(format!("tensor {name:?}: {message}")),
            })?;
            tensors.insert(name, entry);
        }
        Ok(MappedFile { path: path.to_owned(), mmap, tensors })
    }
}

enum EntryProblem {
    Dtype(String),
    Invalid(String),
}

fn parse_entry(name: &str, info: &serde_json::Value, data_start: usize, data_len: usize) -> Result<TensorEntry, EntryProblem> {
    let invalid = |m: &str| EntryProblem::Invalid(m.to_owned());
    let dtype_name = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| invalid("no dtype"))?;
    let dtype = match dtype_name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => return Err(EntryProblem::Dtype(other.to_owned())),
    };
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| invalid("no shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| invalid("shape is not a list of sizes"))?;
    let offsets = info.get("data_offsets").and_then(|o| o.as_array()).ok_or_else(|| invalid("no data_offsets"))?;
    let (Some(begin), Some(end)) = (offsets.first().and_then(|v| v.as_u64()), offsets.get(1).and_then(|v| v.as_u64()))
    else {
        return Err(invalid("data_offsets is not [begin, end]"));
    };
    let (begin, end) = (begin as usize, end as usize);
    let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
    if end < begin || end - begin != expected {
        return Err(EntryProblem::Invalid(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, shape {shape:?} of {dtype} needs {expected}",
            end.saturating_sub(begin)
        )));
    }
    if end > data_len {
        return Err(EntryProblem::Invalid(format!(
            "data ends at byte {end} but the file holds only {data_len} bytes of data (truncated file) [{name}]"
        )));
    }
    Ok(TensorEntry { dtype, shape, start: data_start + begin, end: data_start + end })
}

/// Where a model's weights come from.
pub enum WeightSource {
    Checkpoint(Checkpoint),
    /// Deterministic pseudo-random weights of the right shapes, generated on demand.
    Dummy { seed: u64 },
}

impl WeightSource {
    /// Tensor `name` of `shape`, sharded as asked.
    pub fn tensor(&self, name: &str, shape: &[usize], shard: Shard) -> Result<HostTensor<'_>> {
        match self {
            WeightSource::Checkpoint(c) => c.tensor(name, shape, shard),
            WeightSource::Dummy { seed } => {
                let (dim, start, len) = shard.range(shape)?.unwrap_or((0, 0, shape.first().copied().unwrap_or(1)));
                let mut out_shape = shape.to_vec();
                if !out_shape.is_empty() {
                    out_shape[dim] = len;
                }
                let data = dummy_tensor(*seed, name, shape, dim, start..start + len);
                Ok(HostTensor { dtype: DType::F32, shape: out_shape, data: Cow::Owned(data) })
            }
        }
    }
}

/// Norm weights are 1; everything else uniform in ±1/sqrt(fan_in). Element `i` of the full
/// tensor depends only on (seed, name, i), so a rank generates just its rows `rows` of `dim`.
fn dummy_tensor(seed: u64, name: &str, shape: &[usize], dim: usize, rows: std::ops::Range<usize>) -> Vec<u8> {
    let outer: usize = shape[..dim.min(shape.len())].iter().product();
    let inner: usize = shape.get(dim + 1..).map_or(1, |s| s.iter().product());
    let full_rows = shape.get(dim).copied().unwrap_or(1);
    let n = outer * rows.len() * inner;
    if name.ends_with("norm.weight") {
        return 1.0f32.to_le_bytes().repeat(n);
    }
    let fan_in = *shape.last().unwrap_or(&1) as f32;
    let scale = if name.contains("embed_tokens") { 1.0 } else { 1.0 / fan_in.sqrt() };
    let base = name.bytes().fold(seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
    let mut out = vec![0u8; n * 4];
    let len = rows.len();
    // One output row (o, r) per task: large tensors are generated on every core.
    out.par_chunks_mut((inner * 4).max(1)).enumerate().for_each(|(at, row)| {
        let (o, r) = (at / len, rows.start + at % len);
        for (i, bytes) in row.chunks_exact_mut(4).enumerate() {
            let mut state = base.wrapping_add((((o * full_rows + r) * inner + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let r = crate::sampling::splitmix64(&mut state);
            let unit = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            bytes.copy_from_slice(&((unit * 2.0 - 1.0) * scale).to_le_bytes());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_dim0_borrows_and_dim1_copies_the_right_elements() {
        // 2 x 4 matrix of u8-sized "f16" pairs: use F16 (2 bytes per element).
        let bytes: Vec<u8> = (0u8..16).collect();
        let t = slice_host(DType::F16, &[2, 4], &bytes, Shard::Slice { dim: 0, rank: 1, world: 2 }).unwrap();
        assert!(matches!(t.data, Cow::Borrowed(_)));
        assert_eq!(&*t.data, &bytes[8..16]);
        let t = slice_host(DType::F16, &[2, 4], &bytes, Shard::Slice { dim: 1, rank: 1, world: 2 }).unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(&*t.data, &[4, 5, 6, 7, 12, 13, 14, 15]);
        assert!(slice_host(DType::F16, &[2, 4], &bytes, Shard::Slice { dim: 1, rank: 0, world: 3 }).is_err());
    }

    #[test]
    fn dummy_weights_are_deterministic_and_bounded() {
        let name = "model.layers.0.mlp.up_proj.weight";
        let a = dummy_tensor(7, name, &[8, 16], 0, 0..8);
        let b = dummy_tensor(7, name, &[8, 16], 0, 0..8);
        let c = dummy_tensor(8, name, &[8, 16], 0, 0..8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // A shard generates exactly the full tensor's elements.
        let source = WeightSource::Dummy { seed: 7 };
        let full = source.tensor(name, &[8, 16], Shard::Full).unwrap();
        let part = source.tensor(name, &[8, 16], Shard::Range { dim: 1, start: 4, len: 8 }).unwrap();
        let expect = slice_host(DType::F32, &[8, 16], &full.data, Shard::Range { dim: 1, start: 4, len: 8 }).unwrap();
        assert_eq!(part.shape, vec![8, 8]);
        assert_eq!(part.data, expect.data);
        for v in a.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())) {
            assert!(v.abs() <= 0.25 + 1e-6);
        }
    }
}
