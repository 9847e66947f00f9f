//! The CPU backend: activations are f32 candle tensors; weight matrices are kept as the
//! loader hands them over (f32, bf16, f16, or 8-bit values with row scales; a checkpoint's
//! bytes stay mapped, uncopied, where the layout allows). Every product goes through the
//! batch-invariant kernel in [`super::gemv`] (a row's result never depends on the rest of
//! the batch). Paged attention runs directly on the block-paged cache.

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::{AttentionMeta, Backend, DType, Elem, Heads, KvShape, RowsUpdate, matmul_t, rope_inv_freq, route_top_k};
use crate::error::{EngineError, Result};
use crate::weights::{HostBytes, HostMatrix, HostTensor};

#[derive(Debug, Clone, Default)]
pub struct Cpu;

/// The threads every CPU op runs on (one per core, or `RAYON_NUM_THREADS`).
fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("cpu-backend-{i}"))
            .build()
            .unwrap_or_else(|e| panic!("cannot start the CPU backend's threads: {e}"))
    })
}

/// Steps under way in this process: the first one's guard holds `true`.
struct Polling(bool);

static STEPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Polling {
    fn start() -> Self {
        Polling(STEPS.fetch_add(1, std::sync::atomic::Ordering::AcqRel) == 0)
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        STEPS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Sets its flag when dropped: when the step's work returns, or unwinds.
struct StepDone<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StepDone<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// How long a polling thread goes without finding a task before it returns to sleeping
/// (a step waiting on another rank, say, leaves the core to others).
const POLL_IDLE: std::time::Duration = std::time::Duration::from_micros(500);

/// Runs this pool's tasks as they appear until `done`, or until none came for [`POLL_IDLE`].
fn poll_for_tasks(done: &std::sync::atomic::AtomicBool) {
    let mut idle_since = std::time::Instant::now();
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = std::time::Instant::now(),
            Some(rayon::Yield::Idle) if idle_since.elapsed() < POLL_IDLE => std::thread::yield_now(),
            _ => return,
        }
    }
}

/// A weight matrix `[rows, cols]`: elements of `elem`, times `scales[r]` per row when scaled.
#[derive(Clone)]
pub struct CpuWeight(std::sync::Arc<Matrix>);

struct Matrix {
    rows: usize,
    cols: usize,
    elem: Elem,
    bytes: HostBytes<'static>,
    scales: Option<Vec<f32>>,
}

impl std::fmt::Debug for CpuWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuWeight([{}, {}] {:?}{})", self.0.rows, self.0.cols, self.0.elem, if self.0.scales.is_some() { " scaled" } else { "" })
    }
}

/// One layer's paged cache: `[num_blocks, block_size, num_kv_heads, head_dim]` for K and V.
pub struct CpuKvCache {
    shape: KvShape,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn candle_dtype(d: DType) -> candle_core::DType {
    match d {
        DType::F32 => candle_core::DType::F32,
        DType::F16 => candle_core::DType::F16,
        DType::BF16 => candle_core::DType::BF16,
    }
}

/// Runs `f` on the contiguous f32 elements of `t` without copying them.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(EngineError::Backend("tensor is not on the CPU".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| EngineError::Backend("tensor is not contiguous".into()))?;
    Ok(f(&data[start..end]))
}

fn from_vec(v: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

impl Backend for Cpu {
    type Tensor = Tensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn execute<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        pool().install(|| {
            // Only one step at a time polls: the pollers of one step would otherwise hold
            // the threads that another step (a rank in the same process) needs.
            let polling = Polling::start();
            if pool().current_num_threads() < 2 || !polling.0 {
                return work();
            }
            // For the length of the step, the other threads poll for its parallel tasks
            // instead of sleeping between them: a sleeping thread took 20–80 µs to join a
            // product, and a decode step starts about a hundred of them. Between polls they
            // yield the core to the OS, so a machine shared with other ranks loses little.
            let caller = rayon::current_thread_index();
            let done = std::sync::atomic::AtomicBool::new(false);
            rayon::scope(|s| {
                s.spawn_broadcast(|_, ctx| {
                    if Some(ctx.index()) != caller {
                        poll_for_tasks(&done);
                    }
                });
                let _done = StepDone(&done);
                work()
            })
        })
    }

    fn upload(&self, host: HostTensor<'_>, dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_raw_buffer(&host.data, candle_dtype(host.dtype), &host.shape, &Device::Cpu)?;
        Ok(t.to_dtype(candle_dtype(dtype))?)
    }

    fn upload_weight(&self, host: HostMatrix<'static>) -> Result<CpuWeight> {
        let (rows, cols) = host.dims();
        let (elem, bytes, scales) = match host {
            HostMatrix::Dense(t) => (Elem::from(t.dtype), t.data, None),
            HostMatrix::Scaled { elem, values, scales, .. } => (elem, values, Some(scales)),
        };
        if bytes.len() != rows * cols * elem.bytes() || scales.as_ref().is_some_and(|s| s.len() != rows) {
            return Err(EngineError::Backend(format!("upload_weight: {} bytes for [{rows}, {cols}] of {elem:?}", bytes.len())));
        }
        Ok(CpuWeight(std::sync::Arc::new(Matrix { rows, cols, elem, bytes, scales })))
    }

    fn dims(&self, x: &Tensor) -> (usize, usize) {
        let d = x.dims();
        (d[0], d.get(1).copied().unwrap_or(1))
    }

    fn weight_dims(&self, w: &CpuWeight) -> (usize, usize) {
        (w.0.rows, w.0.cols)
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> Result<Tensor> {
        let t = &*table.0;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= t.rows) {
            return Err(EngineError::Backend(format!("embedding: id {bad} outside the table's {} rows", t.rows)));
        }
        let row_bytes = t.cols * t.elem.bytes();
        let mut out = vec![0f32; ids.len() * t.cols];
        for (o, &id) in out.chunks_exact_mut(t.cols.max(1)).zip(ids) {
            let row = &t.bytes[id as usize * row_bytes..(id as usize + 1) * row_bytes];
            let scale = t.scales.as_ref().map_or(1.0, |s| s[id as usize]);
            for (c, o) in o.iter_mut().enumerate() {
                *o = t.elem.get(row, c) * scale;
            }
        }
        from_vec(out, ids.len(), t.cols)
    }

    fn linear(&self, x: &Tensor, w: &CpuWeight) -> Result<Tensor> {
        let (m, k) = self.dims(x);
        let w = &*w.0;
        let (n, kw) = (w.rows, w.cols);
        if k != kw {
            return Err(EngineError::Backend(format!("linear: x is [{m}, {k}] but w is [{n}, {kw}]")));
        }
        let x = x.contiguous()?;
        let mut out = with_f32(&x, |xs| matmul_t(xs, &w.bytes, w.elem, m, n, k))?;
        if let Some(scales) = &w.scales {
            for row in out.chunks_exact_mut(n.max(1)) {
                for (o, s) in row.iter_mut().zip(scales) {
                    *o *= s;
                }
            }
        }
        from_vec(out, m, n)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let (rows, cols) = self.dims(x);
        let x = x.contiguous()?;
        let weight = weight.to_dtype(candle_core::DType::F32)?;
        let out = with_f32(&x, |xs| {
            with_f32(&weight, |w| {
                let mut out = vec![0f32; xs.len()];
                for (row, o) in xs.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
                    let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
                    let inv = 1.0 / (ms + eps as f32).sqrt();
                    for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
                        *o = w * (v * inv);
                    }
                }
                out
            })
        })??;
        from_vec(out, rows, cols)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok((a + b)?)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }

    fn rope(&self, x: &Tensor, heads: Heads, positions: &[u32], theta: f64) -> Result<Tensor> {
        let (rows, cols) = self.dims(x);
        let Heads { num_heads, head_dim } = heads;
        if cols != num_heads * head_dim || rows != positions.len() {
            return Err(EngineError::Backend(format!("rope: x is [{rows}, {cols}], {} positions", positions.len())));
        }
        let half = head_dim / 2;
        let inv_freq = rope_inv_freq(head_dim, theta);
        let x = x.contiguous()?;
        let out = with_f32(&x, |xs| {
            let mut out = vec![0f32; xs.len()];
            let mut cos = vec![0f32; half];
            let mut sin = vec![0f32; half];
            for ((row, o), &pos) in xs.chunks_exact(cols).zip(out.chunks_exact_mut(cols)).zip(positions) {
                for i in 0..half {
                    let angle = pos as f32 * inv_freq[i];
                    (cos[i], sin[i]) = (angle.cos(), angle.sin());
                }
                for (h, o) in row.chunks_exact(head_dim).zip(o.chunks_exact_mut(head_dim)) {
                    for i in 0..half {
                        let (a, b) = (h[i], h[i + half]);
                        o[i] = a * cos[i] - b * sin[i];
                        o[i + half] = b * cos[i] + a * sin[i];
                    }
                }
            }
            out
        })?;
        from_vec(out, rows, cols)
    }

    fn alloc_kv_cache(&self, shape: KvShape) -> Result<CpuKvCache> {
        let n = shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim;
        Ok(CpuKvCache { shape, k: vec![0.0; n], v: vec![0.0; n] })
    }

    fn write_kv(&self, cache: &mut CpuKvCache, k: &Tensor, v: &Tensor, slots: &[u32]) -> Result<()> {
        let width = cache.shape.num_kv_heads * cache.shape.head_dim;
        let capacity = cache.shape.num_blocks * cache.shape.block_size;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(EngineError::Backend(format!("KV slot {bad} out of range (cache holds {capacity})")));
        }
        for (src, dst) in [(k, &mut cache.k), (v, &mut cache.v)] {
            let src = src.contiguous()?;
            with_f32(&src, |rows| {
                for (row, &slot) in rows.chunks_exact(width).zip(slots) {
                    dst[slot as usize * width..(slot as usize + 1) * width].copy_from_slice(row);
                }
            })?;
        }
        Ok(())
    }

    fn paged_attention(&self, q: &Tensor, cache: &CpuKvCache, heads: Heads, meta: &AttentionMeta) -> Result<Tensor> {
        let (rows, cols) = self.dims(q);
        let Heads { num_heads, head_dim } = heads;
        let kv_heads = cache.shape.num_kv_heads;
        let group = num_heads / kv_heads;
        let width = kv_heads * head_dim;
        let bs = meta.block_size;
        let scale = 1.0 / (head_dim as f32).sqrt();
        // (sequence, token within the batch) for every row, so rows can run in parallel.
        let mut owner = vec![0usize; rows];
        for (s, seq) in meta.seqs.iter().enumerate() {
            owner[seq.token_start..seq.token_start + seq.num_tokens].fill(s);
        }
        let q = q.contiguous()?;
        let out = with_f32(&q, |qs| {
            let mut out = vec![0f32; rows * cols];
            out.par_chunks_mut(cols).enumerate().for_each(|(row, o)| {
                let seq = &meta.seqs[owner[row]];
                let pos = meta.positions[row] as usize;
                let first = meta.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let span = pos + 1 - first;
                let mut scores = vec![0f32; span];
                for h in 0..num_heads {
                    let kvh = h / group;
                    let qh = &qs[row * cols + h * head_dim..row * cols + (h + 1) * head_dim];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let p = first + j;
                        let slot = seq.block_table[p / bs] as usize * bs + p % bs;
                        let kh = &cache.k[slot * width + kvh * head_dim..slot * width + (kvh + 1) * head_dim];
                        *s = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let oh = &mut o[h * head_dim..(h + 1) * head_dim];
                    for (j, &s) in scores.iter().enumerate() {
                        let p = first + j;
                        let slot = seq.block_table[p / bs] as usize * bs + p % bs;
                        let vh = &cache.v[slot * width + kvh * head_dim..slot * width + (kvh + 1) * head_dim];
                        let wgt = s / sum;
                        for (o, v) in oh.iter_mut().zip(vh) {
                            *o += wgt * v;
                        }
                    }
                }
            });
            out
        })?;
        from_vec(out, rows, cols)
    }

    fn router_top_k(&self, logits: &Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let (_, experts) = self.dims(logits);
        let host = self.to_host(logits)?;
        Ok(route_top_k(&host, experts, k))
    }

    fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(rows, &Device::Cpu)?;
        Ok(x.index_select(&ids, 0)?)
    }

    fn scatter_add_rows(&self, num_rows: usize, parts: &[RowsUpdate<'_, Tensor>]) -> Result<Tensor> {
        let Some(first) = parts.first() else {
            return Err(EngineError::Backend("scatter_add_rows with no parts".into()));
        };
        let (_, cols) = self.dims(first.src);
        let mut out = vec![0f32; num_rows * cols];
        for part in parts {
            let src = part.src.contiguous()?;
            with_f32(&src, |src| {
                for ((row, &dst), &w) in src.chunks_exact(cols).zip(part.rows).zip(part.weights) {
                    let o = &mut out[dst as usize * cols..(dst as usize + 1) * cols];
                    for (o, v) in o.iter_mut().zip(row) {
                        *o += w * v;
                    }
                }
            })?;
        }
        from_vec(out, num_rows, cols)
    }

    fn to_host(&self, x: &Tensor) -> Result<Vec<f32>> {
        Ok(x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn upload_activations(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
        if data.len() != rows * cols {
            return Err(EngineError::Backend(format!("upload_activations: {} elements for [{rows}, {cols}]", data.len())));
        }
        from_vec(data, rows, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps from several threads at once (ranks in one process) all finish, with the right
    /// results: one step's pollers never hold up another step for good.
    #[test]
    fn concurrent_steps_all_finish() {
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let n = 10_000 + 1000 * t + i;
                        let sum: u64 = Cpu.execute(|| (0..n).into_par_iter().sum());
                        assert_eq!(sum, n * (n - 1) / 2, "thread {t}, step {i}");
                    }
                    tx.send(t).expect("the test is waiting");
                })
            })
            .collect();
        drop(tx);
        for _ in 0..threads.len() {
            rx.recv_timeout(std::time::Duration::from_secs(60)).expect("every thread's steps finish within a minute");
        }
        for t in threads {
            t.join().expect("no step failed");
        }
    }

    #[test]
    fn a_failing_step_unwinds_and_the_next_step_runs() {
        let failed = std::panic::catch_unwind(|| Cpu.execute(|| (0..1000u32).into_par_iter().for_each(|i| assert_ne!(i, 500, "a task fails"))));
        assert!(failed.is_err(), "the task's panic reaches the caller");
        assert_eq!(Cpu.execute(|| (0..100u64).into_par_iter().sum::<u64>()), 4950);
    }
}
