//! Where weights come from: Hugging Face safetensors checkpoints (one file or sharded with
//! `model.safetensors.index.json`), memory-mapped and read tensor by tensor, or deterministic
//! random weights (`--load-format dummy`) for any config.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;

use crate::backend::{DType, Elem};
use crate::error::{EngineError, Result};

/// Bytes of a tensor in host memory: a range of a mapped checkpoint file (kept mapped for
/// as long as the bytes live: no copy), borrowed, or owned.
#[derive(Debug, Clone)]
pub enum HostBytes<'a> {
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    /// Made at load (see [`Buffer`]).
    Made(Arc<MmapMut>),
}

/// Zeroed memory for a weight made at load (dummy, converted or quantized), in the
/// kernel's default pages. Not transparent huge pages: a fresh huge page is zeroed whole
/// at its first touch, and on virtual machines that first touch costs the most; measured
/// on one, 3.2 GB took 0.7–10.9 s to touch in huge pages and 2.0–2.6 s in small ones, and
/// a Mistral-7B-shaped dummy load 20–35 s against 11–18 s, with the same decode speed. On
/// another, whose balloon hands freed memory back to the host, the same load took
/// 17.7–18.5 s in huge pages and 15.2–16.6 s in small ones on memory the host had taken
/// back (1.4 s against 4.9–5.8 s on memory freed just before): there a load runs at the
/// rate the host gives fresh memory (touching 14 GB, one byte a page, took 16.0–16.3 s).
pub struct Buffer(MmapMut);

impl Buffer {
    pub fn zeroed(len: usize) -> Result<Self> {
        let map = MmapMut::map_anon(len.max(1)).map_err(|e| EngineError::Backend(format!("allocating {len} bytes: {e}")))?;
        Ok(Buffer(map))
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn freeze(self) -> HostBytes<'static> {
        HostBytes::Made(Arc::new(self.0))
    }
}

impl HostBytes<'_> {
    /// These bytes without a borrow: mapped and owned bytes as they are, borrowed ones copied.
    pub fn into_static(self) -> HostBytes<'static> {
        match self {
            HostBytes::Mapped { map, range } => HostBytes::Mapped { map, range },
            HostBytes::Borrowed(b) => HostBytes::Owned(b.to_vec()),
            HostBytes::Owned(v) => HostBytes::Owned(v),
            HostBytes::Made(m) => HostBytes::Made(m),
        }
    }
}

impl std::ops::Deref for HostBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            HostBytes::Mapped { map, range } => &map[range.clone()],
            HostBytes::Borrowed(b) => b,
            HostBytes::Owned(v) => v,
            HostBytes::Made(m) => &m[..],
        }
    }
}

impl From<Vec<u8>> for HostBytes<'static> {
    fn from(v: Vec<u8>) -> Self {
        HostBytes::Owned(v)
    }
}

/// A tensor in host memory, mapped from a checkpoint where possible.
#[derive(Debug, Clone)]
pub struct HostTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Little-endian elements, row-major.
    pub data: HostBytes<'a>,
}

/// A `[rows, cols]` weight matrix in host memory: dense, or 8-bit values with one f32 scale
/// per row (`w[r, c] = value[r, c] · scales[r]`; symmetric, no zero point).
#[derive(Debug, Clone)]
pub enum HostMatrix<'a> {
    Dense(HostTensor<'a>),
    Scaled { elem: Elem, rows: usize, cols: usize, values: HostBytes<'a>, scales: Vec<f32> },
}

impl HostMatrix<'_> {
    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            HostMatrix::Dense(t) => (t.shape.first().copied().unwrap_or(1), t.shape.get(1).copied().unwrap_or(1)),
            HostMatrix::Scaled { rows, cols, .. } => (*rows, *cols),
        }
    }

    /// Bytes it holds (values and scales).
    pub fn bytes(&self) -> usize {
        match self {
            HostMatrix::Dense(t) => t.data.len(),
            HostMatrix::Scaled { values, scales, .. } => values.len() + 4 * scales.len(),
        }
    }
}

/// The element types a checkpoint may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    Float(DType),
    F8E4M3,
}

impl Stored {
    fn size_in_bytes(self) -> usize {
        match self {
            Stored::Float(d) => d.size_in_bytes(),
            Stored::F8E4M3 => 1,
        }
    }
}

impl std::fmt::Display for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stored::Float(d) => d.fmt(f),
            Stored::F8E4M3 => f.write_str("F8_E4M3"),
        }
    }
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
                    return Err(EngineError::Backend(format!("cannot split dim {dim} of shape {shape:?} into {world} slices (rank {rank})")));
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
    dtype: Stored,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
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
            let text = std::fs::read_to_string(&index_path).map_err(|source| EngineError::Io { path: index_path.clone(), source })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::Checkpoint { path: index_path.clone(), message: e.to_string() })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::Checkpoint { path: index_path.clone(), message: "no `weight_map` object".into() })?;
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

    /// A tensor by its causal LM's name; a `MistralModel` checkpoint (an embedding model)
    /// stores the same tensors without the `model.` prefix.
    fn entry(&self, name: &str) -> Result<(&MappedFile, &TensorEntry)> {
        let stored = match name.strip_prefix("model.") {
            Some(bare) if !self.index.contains_key(name) => bare,
            _ => name,
        };
        let file =
            self.index.get(stored).map(|&i| &self.files[i]).ok_or_else(|| EngineError::MissingTensor { name: name.to_owned(), dir: self.dir.clone() })?;
        Ok((file, &file.tensors[stored]))
    }

    fn check_shape(file: &MappedFile, name: &str, entry: &TensorEntry, shape: &[usize]) -> Result<()> {
        if entry.shape != shape {
            return Err(EngineError::TensorShape { path: file.path.clone(), name: name.to_owned(), found: entry.shape.clone(), expected: shape.to_vec() });
        }
        Ok(())
    }

    /// Reads float tensor `name`, checking it has `shape`, and returns the requested shard of it.
    pub fn tensor(&self, name: &str, shape: &[usize], shard: Shard) -> Result<HostTensor<'static>> {
        let (file, entry) = self.entry(name)?;
        Self::check_shape(file, name, entry, shape)?;
        let Stored::Float(dtype) = entry.dtype else {
            return Err(EngineError::TensorDtype {
                path: file.path.clone(),
                name: name.to_owned(),
                dtype: format!("{} (a float tensor was expected)", entry.dtype),
            });
        };
        let bytes = HostBytes::Mapped { map: file.mmap.clone(), range: entry.start..entry.end };
        let (shape, data) = slice_host(dtype.size_in_bytes(), shape, bytes, shard)?;
        Ok(HostTensor { dtype, shape, data })
    }

    /// Reads projection weight `name` (`[out, in]`) as stored: a float tensor, or FP8 E4M3
    /// values with their `weight_scale` (or `weight_scale_inv`, which also multiplies): one
    /// per tensor (`[]` or `[1]`) or per output row (`[out, 1]` or `[out]`).
    pub fn matrix(&self, name: &str, shape: [usize; 2], shard: Shard) -> Result<HostMatrix<'static>> {
        let (file, entry) = self.entry(name)?;
        if entry.dtype != Stored::F8E4M3 {
            return self.tensor(name, &shape, shard).map(HostMatrix::Dense);
        }
        Self::check_shape(file, name, entry, &shape)?;
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let scale_name = [format!("{base}.weight_scale"), format!("{base}.weight_scale_inv")]
            .into_iter()
            .find(|n| self.index.contains_key(n))
            .ok_or_else(|| EngineError::MissingTensor { name: format!("{base}.weight_scale"), dir: self.dir.clone() })?;
        let (scale_file, scale_entry) = self.entry(&scale_name)?;
        let scale_shape = scale_entry.shape.clone();
        let per_row = match scale_shape.as_slice() {
            [] | [1] => false,
            [o] | [o, 1] if *o == shape[0] => true,
            _ => {
                return Err(EngineError::Checkpoint {
                    path: scale_file.path.clone(),
                    message: format!(
                        "{scale_name} has shape {scale_shape:?}: only per-tensor ([] or [1]) and per-channel ([{}, 1]) FP8 scales are supported, not block- or group-wise ones",
                        shape[0]
                    ),
                });
            }
        };
        let scales = self.tensor(&scale_name, &scale_shape, Shard::Full)?;
        let scales: Vec<f32> = scales.data.chunks_exact(scales.dtype.size_in_bytes()).map(|b| crate::backend::Elem::from(scales.dtype).get(b, 0)).collect();
        let bytes = HostBytes::Mapped { map: file.mmap.clone(), range: entry.start..entry.end };
        let (sharded, values) = slice_host(1, &shape, bytes, shard)?;
        let rows = match shard.range(&shape)? {
            Some((0, start, len)) => start..start + len,
            _ => 0..shape[0],
        };
        let scales = if per_row { scales[rows].to_vec() } else { vec![scales[0]; rows.len()] };
        Ok(HostMatrix::Scaled { elem: Elem::E4m3, rows: sharded[0], cols: sharded[1], values, scales })
    }
}

/// Applies `shard` to a full tensor's bytes (`element` bytes each): a sub-range for dim 0
/// (still mapped), a copy otherwise. Returns the shard's shape and bytes.
fn slice_host<'a>(element: usize, shape: &[usize], bytes: HostBytes<'a>, shard: Shard) -> Result<(Vec<usize>, HostBytes<'a>)> {
    let Some((dim, start, len)) = shard.range(shape)? else {
        return Ok((shape.to_vec(), bytes));
    };
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * element;
    let mut out_shape = shape.to_vec();
    out_shape[dim] = len;
    let row = shape[dim] * inner;
    let (lo, hi) = (start * inner, (start + len) * inner);
    let data = match bytes {
        HostBytes::Mapped { map, range } if outer == 1 => HostBytes::Mapped { map, range: range.start + lo..range.start + hi },
        HostBytes::Borrowed(b) if outer == 1 => HostBytes::Borrowed(&b[lo..hi]),
        bytes => {
            let mut v = Vec::with_capacity(outer * (hi - lo));
            for o in 0..outer {
                v.extend_from_slice(&bytes[o * row + lo..o * row + hi]);
            }
            HostBytes::Owned(v)
        }
    };
    Ok((out_shape, data))
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::Io { path: path.to_owned(), source };
        let bad = |message: String| EngineError::Checkpoint { path: path.to_owned(), message };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; a checkpoint modified while mapped is outside
        // the contract (as for every safetensors reader), and bounds are checked below.
        let mmap = Arc::new(unsafe { Mmap::map(&file) }.map_err(io)?);
        if mmap.len() < 8 {
            return Err(bad(format!("file is {} bytes, too short for a header", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        let data_start = 8usize
            .checked_add(header_len)
            .filter(|&e| e <= mmap.len())
            .ok_or_else(|| bad(format!("header of {header_len} bytes runs past the end of the file (truncated?)")))?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start]).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_len = mmap.len() - data_start;
        let mut tensors = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(&name, &info, data_start, data_len).map_err(|m| match m {
                EntryProblem::Dtype(dtype) => EngineError::TensorDtype { path: path.to_owned(), name: name.clone(), dtype },
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
        "F32" => Stored::Float(DType::F32),
        "F16" => Stored::Float(DType::F16),
        "BF16" => Stored::Float(DType::BF16),
        "F8_E4M3" => Stored::F8E4M3,
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
    let (Some(begin), Some(end)) = (offsets.first().and_then(|v| v.as_u64()), offsets.get(1).and_then(|v| v.as_u64())) else {
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
        return Err(EntryProblem::Invalid(format!("data ends at byte {end} but the file holds only {data_len} bytes of data (truncated file) [{name}]")));
    }
    Ok(TensorEntry { dtype, shape, start: data_start + begin, end: data_start + end })
}

/// Where a model's weights come from.
pub enum WeightSource {
    Checkpoint(Checkpoint),
    /// Deterministic pseudo-random weights of the right shapes, generated on demand.
    Dummy {
        seed: u64,
    },
}

impl WeightSource {
    /// Float tensor `name` of `shape`, sharded as asked. Dummy weights are made in `dummy`.
    pub fn tensor(&self, name: &str, shape: &[usize], shard: Shard, dummy: DType) -> Result<HostTensor<'static>> {
        match self {
            WeightSource::Checkpoint(c) => c.tensor(name, shape, shard),
            WeightSource::Dummy { seed } => {
                let (dim, start, len) = shard.range(shape)?.unwrap_or((0, 0, shape.first().copied().unwrap_or(1)));
                let mut out_shape = shape.to_vec();
                if !out_shape.is_empty() {
                    out_shape[dim] = len;
                }
                let data = dummy_tensor(*seed, name, shape, dim, start..start + len, dummy)?;
                Ok(HostTensor { dtype: dummy, shape: out_shape, data })
            }
        }
    }

    /// Projection weight `name` (`[out, in]`) as stored, sharded as asked (see
    /// [`Checkpoint::matrix`]). Dummy weights are made in `dummy`.
    pub fn matrix(&self, name: &str, shape: [usize; 2], shard: Shard, dummy: DType) -> Result<HostMatrix<'static>> {
        match self {
            WeightSource::Checkpoint(c) => c.matrix(name, shape, shard),
            WeightSource::Dummy { .. } => self.tensor(name, &shape, shard, dummy).map(HostMatrix::Dense),
        }
    }
}

/// A 32-bit finaliser (murmur3's): every input bit moves every output bit.
#[inline(always)]
fn hash32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Elements `first..` of a dummy tensor keyed `key`, uniform in ±`scale`, written to `row`
/// in `dtype`; with AVX2 where the CPU has it (the same bits: integer hashing, then one
/// multiply, subtract and multiply, each rounded, as in the portable loop).
fn fill_row(key: u32, first: u32, scale: f32, dtype: DType, row: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { fill_row_avx2(key, first, scale, dtype, row) };
    }
    fill_row_portable(key, first, scale, dtype, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_row_avx2(key: u32, first: u32, scale: f32, dtype: DType, row: &mut [u8]) {
    fill_row_portable(key, first, scale, dtype, row)
}

/// Blocks of 64 elements in two loops the compiler vectorizes: a 32-bit hash of
/// (key, index) per element, then the block in `dtype` (round to nearest even).
#[inline(always)]
fn fill_row_portable(key: u32, first: u32, scale: f32, dtype: DType, row: &mut [u8]) {
    const BLOCK: usize = 64;
    let size = dtype.size_in_bytes();
    let mut values = [0f32; BLOCK];
    for (b, out) in row.chunks_mut(BLOCK * size).enumerate() {
        let start = first.wrapping_add((b * BLOCK) as u32);
        for (i, v) in values.iter_mut().enumerate() {
            let h = hash32(key ^ start.wrapping_add(i as u32));
            *v = ((h >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0) * scale;
        }
        let n = out.len() / size;
        match dtype {
            DType::F32 => {
                let words = values.map(|v| v.to_bits().to_le());
                out.copy_from_slice(&as_bytes(&words)[..n * 4]);
            }
            DType::BF16 => {
                let halves = values.map(|v| {
                    let bits = v.to_bits();
                    (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16).to_le()
                });
                out.copy_from_slice(&as_bytes(&halves)[..n * 2]);
            }
            DType::F16 => {
                let halves = values.map(|v| half::f16::from_f32(v).to_bits().to_le());
                out.copy_from_slice(&as_bytes(&halves)[..n * 2]);
            }
        }
    }
}

/// The bytes of integers already in little-endian order.
fn as_bytes<T: Copy, const N: usize>(words: &[T; N]) -> &[u8] {
    // SAFETY: plain integers have no padding, and a u8 needs no alignment.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), std::mem::size_of_val(words)) }
}

/// Norm weights are 1; everything else uniform in ±1/sqrt(fan_in), rounded to `dtype`.
/// Element `i` of the full tensor depends only on (seed, name, i), so a rank generates just
/// its rows `rows` of `dim`, on every core.
fn dummy_tensor(seed: u64, name: &str, shape: &[usize], dim: usize, rows: std::ops::Range<usize>, dtype: DType) -> Result<HostBytes<'static>> {
    let outer: usize = shape[..dim.min(shape.len())].iter().product();
    let inner: usize = shape.get(dim + 1..).map_or(1, |s| s.iter().product());
    let full_rows = shape.get(dim).copied().unwrap_or(1);
    let n = outer * rows.len() * inner;
    let size = dtype.size_in_bytes();
    let put = |bytes: &mut [u8], v: f32| match dtype {
        DType::F32 => bytes.copy_from_slice(&v.to_le_bytes()),
        DType::BF16 => bytes.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        DType::F16 => bytes.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
    };
    let mut buffer = Buffer::zeroed(n * size)?;
    let out = &mut buffer.bytes_mut()[..n * size];
    if name.ends_with("norm.weight") {
        out.par_chunks_exact_mut(size).for_each(|b| put(b, 1.0));
        return Ok(buffer.freeze());
    }
    let fan_in = *shape.last().unwrap_or(&1) as f32;
    let scale = if name.contains("embed_tokens") { 1.0 } else { 1.0 / fan_in.sqrt() };
    let base = name.bytes().fold(seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
    // For each index `o` of the dimensions before `dim`, the rank's rows are one contiguous
    // span of the full tensor, made in pieces of 64 Ki elements, one per task (every core, at
    // 3–4 GB/s a core in bf16 with AVX2: the fresh pages' first touch, not the generator,
    // bounds a load). A piece per row would be one element per task for a column slice.
    const PIECE: usize = 1 << 16;
    let span = rows.len() * inner;
    let key = (base as u32) ^ (base >> 32) as u32;
    out.par_chunks_mut((span * size).max(1)).enumerate().for_each(|(o, span_bytes)| {
        let start = (o * full_rows + rows.start) * inner;
        span_bytes.par_chunks_mut(PIECE * size).enumerate().for_each(|(p, piece)| {
            // The element index modulo 2³² (tensors are far smaller), keyed by the name.
            fill_row(key, (start + p * PIECE) as u32, scale, dtype, piece);
        });
    });
    Ok(buffer.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_dim0_borrows_and_dim1_copies_the_right_elements() {
        // 2 x 4 matrix of u8-sized "f16" pairs: use F16 (2 bytes per element).
        let bytes: Vec<u8> = (0u8..16).collect();
        let borrowed = || HostBytes::Borrowed(&bytes);
        let (_, t) = slice_host(2, &[2, 4], borrowed(), Shard::Slice { dim: 0, rank: 1, world: 2 }).unwrap();
        assert!(matches!(t, HostBytes::Borrowed(_)));
        assert_eq!(&*t, &bytes[8..16]);
        let (shape, t) = slice_host(2, &[2, 4], borrowed(), Shard::Slice { dim: 1, rank: 1, world: 2 }).unwrap();
        assert_eq!(shape, vec![2, 2]);
        assert_eq!(&*t, &[4, 5, 6, 7, 12, 13, 14, 15]);
        assert!(slice_host(2, &[2, 4], borrowed(), Shard::Slice { dim: 1, rank: 0, world: 3 }).is_err());
    }

    #[test]
    fn dummy_rows_have_the_same_bits_on_every_path() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // A length that is not a multiple of the block, so the tail is covered too.
            let len = 1000 * dtype.size_in_bytes();
            let (mut fast, mut portable) = (vec![0u8; len], vec![0u8; len]);
            fill_row(0xDEAD_BEEF, 0xFFFF_FE00, 0.03, dtype, &mut fast);
            fill_row_portable(0xDEAD_BEEF, 0xFFFF_FE00, 0.03, dtype, &mut portable);
            assert_eq!(fast, portable, "{dtype:?}");
            // Every element as the per-element definition makes it (the index wraps at 2³²).
            let want: Vec<u8> = (0..1000u32)
                .flat_map(|i| {
                    let h = hash32(0xDEAD_BEEF ^ 0xFFFF_FE00u32.wrapping_add(i));
                    let v = ((h >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0) * 0.03;
                    match dtype {
                        DType::F32 => v.to_le_bytes().to_vec(),
                        DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                        DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    }
                })
                .collect();
            assert_eq!(fast, want, "{dtype:?}");
        }
    }

    #[test]
    fn dummy_weights_are_deterministic_and_bounded() {
        let name = "model.layers.0.mlp.up_proj.weight";
        let a = dummy_tensor(7, name, &[8, 16], 0, 0..8, DType::F32).unwrap().to_vec();
        let b = dummy_tensor(7, name, &[8, 16], 0, 0..8, DType::F32).unwrap().to_vec();
        let c = dummy_tensor(8, name, &[8, 16], 0, 0..8, DType::F32).unwrap().to_vec();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // A shard generates exactly the full tensor's elements.
        let source = WeightSource::Dummy { seed: 7 };
        let full = source.tensor(name, &[8, 16], Shard::Full, DType::F32).unwrap();
        let part = source.tensor(name, &[8, 16], Shard::Range { dim: 1, start: 4, len: 8 }, DType::F32).unwrap();
        let (_, expect) = slice_host(4, &[8, 16], full.data, Shard::Range { dim: 1, start: 4, len: 8 }).unwrap();
        assert_eq!(part.shape, vec![8, 8]);
        assert_eq!(&*part.data, &*expect);
        // Slices of either dimension longer than a task's piece of 64 Ki elements.
        let shape = [3, 150_000];
        let full = source.tensor(name, &shape, Shard::Full, DType::BF16).unwrap();
        for shard in [Shard::Range { dim: 1, start: 1_000, len: 140_000 }, Shard::Range { dim: 0, start: 1, len: 2 }] {
            let part = source.tensor(name, &shape, shard, DType::BF16).unwrap();
            let (_, expect) = slice_host(2, &shape, HostBytes::Borrowed(&full.data), shard).unwrap();
            assert!(*part.data == *expect, "{shard:?}");
        }
        // In bf16: the f32 values rounded.
        let rounded = source.tensor(name, &[8, 16], Shard::Full, DType::BF16).unwrap();
        for (h, f) in rounded.data.chunks_exact(2).zip(a.chunks_exact(4)) {
            assert_eq!(Elem::Bf16.get(h, 0), half::bf16::from_f32(Elem::F32.get(f, 0)).to_f32());
        }
        for v in a.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())) {
            assert!(v.abs() <= 0.25 + 1e-6);
        }
    }
}
