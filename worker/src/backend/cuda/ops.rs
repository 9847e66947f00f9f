//! [`Backend`] on the GPU: each operation is a kernel launch or a cuBLAS call on the
//! backend's stream.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{Buf, Cuda, CudaKvCache, CudaTensor, cuda_err, elementwise, per_row, push_buf, type_suffix};
use crate::backend::{AttentionMeta, Backend, DType, Heads, KvShape, RowsUpdate, rope_inv_freq};
use crate::error::{EngineError, Result};
use crate::sampling::{RowChoice, TokenLogprobs, uniform};
use crate::weights::{HostMatrix, HostTensor};

/// Most alternatives per row the choose kernel reports (`MAX_TOP` in kernels.cu).
const MAX_TOP: usize = 20;
const CHOICE_WORDS: usize = 8;
const CHOSEN_WORDS: usize = 2 + 2 * MAX_TOP;
/// Largest batch the small-batch product kernel takes (`gemv_small` in kernels.cu).
const GEMV_MAX_ROWS: usize = 4;
const MAX_HEAD_DIM: usize = 256;
/// Threads of a paged-attention block (`ATTN_WARPS` warps in kernels.cu).
const ATTN_THREADS: u32 = 16 * 32;
const MAX_EXPERTS: usize = 256;

fn bad(msg: String) -> EngineError {
    EngineError::Backend(msg)
}

/// A host tensor's elements as f32.
fn host_f32(host: &HostTensor<'_>) -> Vec<f32> {
    let d = &host.data;
    match host.dtype {
        DType::F32 => d.par_chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => d.par_chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::F16 => d.par_chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

/// A host tensor's elements as the bits of 2-byte `dtype`.
fn host_half_bits(host: &HostTensor<'_>, dtype: DType) -> Vec<u16> {
    if host.dtype == dtype {
        return host.data.par_chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    }
    let values = host_f32(host);
    match dtype {
        DType::BF16 => values.par_iter().map(|&v| bf16::from_f32(v).to_bits()).collect(),
        _ => values.par_iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
    }
}

fn blas_type(d: DType) -> cudaDataType_t {
    match d {
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
    }
}

impl Cuda {
    fn upload_f32(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        let padded: &[f32] = if data.is_empty() { &[0.0] } else { data };
        self.inner.stream.clone_htod(padded).map_err(cuda_err("uploading values"))
    }

    /// `out = x · wᵀ` through cuBLAS: `x` is `[m, k]` of `x_type` at `x_ptr`, `w` `[n, k]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, w: &Buf, x_ptr: u64, x_type: DType, out: &mut CudaSlice<f32>, m: usize, n: usize, k: usize) -> Result<()> {
        let stream = &self.inner.stream;
        let (w_ptr, _w) = match w {
            Buf::F32(s) => s.device_ptr(stream),
            Buf::Bf16(s) | Buf::F16(s) => s.device_ptr(stream),
        };
        let (o_ptr, _o) = out.device_ptr_mut(stream);
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: outᵀ [n, m] = W [n, k] (stored as Wᵀ column-major) · xᵀ [k, m].
        // SAFETY: the pointers are live device buffers of the sizes the dimensions describe.
        unsafe {
            gemm_ex(
                *self.inner.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w_ptr as *const c_void,
                blas_type(w.dtype()),
                k as i32,
                x_ptr as *const c_void,
                blas_type(x_type),
                k as i32,
                &beta as *const f32 as *const c_void,
                o_ptr as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(cuda_err("cublasGemmEx"))
    }

    /// A `[0, cols]` tensor (no launch has anything to do for it).
    fn empty(&self, cols: usize) -> Result<CudaTensor> {
        Ok(Cuda::tensor(Buf::F32(self.alloc_f32(1)?), 0, cols))
    }

    fn same_len(&self, what: &str, a: &CudaTensor, b: &CudaTensor) -> Result<()> {
        if a.rows != b.rows || a.cols != b.cols {
            return Err(bad(format!("{what}: [{}, {}] and [{}, {}]", a.rows, a.cols, b.rows, b.cols)));
        }
        Ok(())
    }

    fn binary(&self, kernel: &str, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.same_len(kernel, a, b)?;
        let n = a.len();
        if n == 0 {
            return Ok(CudaTensor { rows: a.rows, ..self.empty(a.cols)? });
        }
        let mut out = self.alloc_f32(n)?;
        let (a_s, b_s) = (a.f32()?, b.f32()?);
        let n64 = n as u64;
        self.launch(kernel, elementwise(n), |l| {
            l.arg(a_s).arg(b_s).arg(&mut out).arg(&n64);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), a.rows, a.cols))
    }
}

/// Which kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// The GEMV kernel where it applies (few rows, 2-byte weights), else cuBLAS.
    Auto,
    Gemv,
    Cublas,
}

impl Cuda {
    /// `x · wᵀ` by the chosen kernel (the benchmark compares them; `linear` picks).
    pub fn linear_with(&self, x: &CudaTensor, w: &CudaTensor, product: Product) -> Result<CudaTensor> {
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if w.cols != k {
            return Err(bad(format!("linear: x is [{m}, {k}] but w is [{n}, {}]", w.cols)));
        }
        if k == 0 || n == 0 {
            return Err(bad(format!("linear: empty weight [{n}, {k}]")));
        }
        if m == 0 {
            return self.empty(n);
        }
        let xs = x.f32()?;
        let mut out = self.alloc_f32(m * n)?;
        let wd = w.buf.dtype();
        let gemv_fits = wd != DType::F32 && m <= GEMV_MAX_ROWS && k % 8 == 0;
        if product == Product::Gemv && !gemv_fits {
            return Err(bad(format!("the GEMV kernel takes 2-byte weights, <= {GEMV_MAX_ROWS} rows and k % 8 == 0")));
        }
        if gemv_fits && product != Product::Cublas {
            let (m_i, n_i, k_i) = (m as i32, n as i32, k as i32);
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            self.launch(&format!("gemv_small_{}", type_suffix(wd)), cfg, |l| {
                push_buf(l, &w.buf);
                l.arg(xs).arg(&mut out).arg(&m_i).arg(&n_i).arg(&k_i);
            })?;
        } else if wd == DType::F32 {
            let (x_ptr, _x) = xs.device_ptr(&self.inner.stream);
            self.gemm(&w.buf, x_ptr, DType::F32, &mut out, m, n, k)?;
        } else {
            // cuBLAS multiplies like types. Rounding x to the weights' 2-byte type would cost
            // the f32 activations their precision, so x goes as two rows of that type, hi and
            // lo, in one product (the weights are read once) whose halves are then added.
            // SAFETY: the split kernel writes every element.
            let mut split = unsafe { self.inner.stream.alloc::<u16>(2 * m * k) }.map_err(cuda_err("allocating device memory"))?;
            let n64 = (m * k) as u64;
            self.launch(&format!("split_f32_to_{}", type_suffix(wd)), elementwise(m * k), |l| {
                l.arg(xs).arg(&mut split).arg(&n64);
            })?;
            let mut both = self.alloc_f32(2 * m * n)?;
            {
                let (x_ptr, _x) = split.device_ptr(&self.inner.stream);
                self.gemm(&w.buf, x_ptr, wd, &mut both, 2 * m, n, k)?;
            }
            let half = (m * n) as u64;
            self.launch("add_halves_f32", elementwise(m * n), |l| {
                l.arg(&both).arg(&mut out).arg(&half);
            })?;
        }
        Ok(Cuda::tensor(Buf::F32(out), m, n))
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Weight = CudaTensor;
    type KvCache = CudaKvCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn execute<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        // A failure to bind shows up as the first operation's error.
        let _ = self.bind();
        work()
    }

    fn upload(&self, host: HostTensor<'_>, dtype: DType) -> Result<CudaTensor> {
        self.bind()?;
        let (rows, cols) = match host.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => return Err(bad(format!("upload: tensors are 1-D or 2-D, got {other:?}"))),
        };
        let stream = &self.inner.stream;
        let buf = match dtype {
            DType::F32 => Buf::F32(stream.clone_htod(&host_f32(&host)).map_err(cuda_err("uploading weights"))?),
            DType::BF16 => Buf::Bf16(stream.clone_htod(&host_half_bits(&host, dtype)).map_err(cuda_err("uploading weights"))?),
            DType::F16 => Buf::F16(stream.clone_htod(&host_half_bits(&host, dtype)).map_err(cuda_err("uploading weights"))?),
        };
        Ok(Cuda::tensor(buf, rows, cols))
    }

    fn upload_weight(&self, host: HostMatrix<'static>) -> Result<CudaTensor> {
        match host {
            HostMatrix::Dense(t) => {
                let dtype = t.dtype;
                self.upload(t, dtype)
            }
            HostMatrix::Scaled { elem, .. } => Err(bad(format!("{elem:?} weights are not supported on the CUDA backend yet (use --quantization none)"))),
        }
    }

    fn dims(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn weight_dims(&self, w: &CudaTensor) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn embedding(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        if let Some(&bad_id) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(bad(format!("embedding: id {bad_id} outside the table's {} rows", table.rows)));
        }
        let cols = table.cols;
        if ids.is_empty() {
            return self.empty(cols);
        }
        let ids_dev = self.upload_u32(ids)?;
        let mut out = self.alloc_f32(ids.len() * cols)?;
        let cols_i = cols as i32;
        let name = format!("embedding_{}", type_suffix(table.buf.dtype()));
        self.launch(&name, per_row(ids.len(), 256), |l| {
            push_buf(l, &table.buf);
            l.arg(&ids_dev).arg(&mut out).arg(&cols_i);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), ids.len(), cols))
    }

    fn linear(&self, x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
        self.linear_with(x, w, Product::Auto)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f64) -> Result<CudaTensor> {
        let (rows, cols) = (x.rows, x.cols);
        let ws = match &*weight.buf {
            Buf::F32(s) if weight.len() == cols => s,
            _ => return Err(bad(format!("rms_norm: the weight must be {cols} f32 values, got {weight:?}"))),
        };
        if rows == 0 {
            return self.empty(cols);
        }
        let xs = x.f32()?;
        let mut out = self.alloc_f32(rows * cols)?;
        let (cols_i, eps_f) = (cols as i32, eps as f32);
        self.launch("rms_norm_f32", per_row(rows, 256), |l| {
            l.arg(xs).arg(ws).arg(&mut out).arg(&cols_i).arg(&eps_f);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), rows, cols))
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("add_f32", a, b)
    }

    fn add_rms_norm(&self, x: &CudaTensor, residual: &CudaTensor, weight: &CudaTensor, eps: f64) -> Result<(CudaTensor, CudaTensor)> {
        self.same_len("add_rms_norm", x, residual)?;
        let (rows, cols) = (x.rows, x.cols);
        let ws = match &*weight.buf {
            Buf::F32(s) if weight.len() == cols => s,
            _ => return Err(bad(format!("add_rms_norm: the weight must be {cols} f32 values, got {weight:?}"))),
        };
        if rows == 0 {
            return Ok((self.empty(cols)?, self.empty(cols)?));
        }
        let (xs, rs) = (x.f32()?, residual.f32()?);
        let mut sum = self.alloc_f32(rows * cols)?;
        let mut out = self.alloc_f32(rows * cols)?;
        let (cols_i, eps_f) = (cols as i32, eps as f32);
        self.launch("add_rms_norm_f32", per_row(rows, 256), |l| {
            l.arg(xs).arg(rs).arg(ws).arg(&mut sum).arg(&mut out).arg(&cols_i).arg(&eps_f);
        })?;
        Ok((Cuda::tensor(Buf::F32(sum), rows, cols), Cuda::tensor(Buf::F32(out), rows, cols)))
    }

    fn swiglu(&self, x: &CudaTensor, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        let (m, k, n) = (x.rows, x.cols, gate.rows);
        let wd = gate.buf.dtype();
        let fused = wd != DType::F32 && up.buf.dtype() == wd && (up.rows, up.cols, gate.cols) == (n, k, k) && m <= GEMV_MAX_ROWS && m > 0 && k % 8 == 0;
        if !fused {
            return self.silu_mul(&self.linear(x, gate)?, &self.linear(x, up)?);
        }
        let xs = x.f32()?;
        let mut out = self.alloc_f32(m * n)?;
        let (m_i, n_i, k_i) = (m as i32, n as i32, k as i32);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.launch(&format!("gemv_swiglu_{}", type_suffix(wd)), cfg, |l| {
            push_buf(l, &gate.buf);
            push_buf(l, &up.buf);
            l.arg(xs).arg(&mut out).arg(&m_i).arg(&n_i).arg(&k_i);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), m, n))
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.binary("silu_mul_f32", gate, up)
    }

    fn rope(&self, x: &CudaTensor, heads: Heads, positions: &[u32], theta: f64) -> Result<CudaTensor> {
        let Heads { num_heads, head_dim } = heads;
        if x.cols != num_heads * head_dim || x.rows != positions.len() || head_dim % 2 != 0 {
            return Err(bad(format!("rope: x is [{}, {}], {} positions, heads {heads:?}", x.rows, x.cols, positions.len())));
        }
        if x.rows == 0 {
            return self.empty(x.cols);
        }
        let pos = self.indices("positions", positions)?;
        // The host's table (f32 bits), so the GPU rotates by exactly the CPU's frequencies.
        let bits: Vec<u32> = rope_inv_freq(head_dim, theta).iter().map(|f| f.to_bits()).collect();
        let inv_freq = self.indices("rope_inv_freq", &bits)?;
        let xs = x.f32()?;
        let mut out = self.alloc_f32(x.len())?;
        let (h_i, d_i) = (num_heads as i32, head_dim as i32);
        self.launch("rope_f32", per_row(x.rows, 256), |l| {
            l.arg(xs).arg(&mut out).arg(&*pos).arg(&*inv_freq).arg(&h_i).arg(&d_i);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), x.rows, x.cols))
    }

    fn alloc_kv_cache(&self, shape: KvShape) -> Result<CudaKvCache> {
        self.bind()?;
        if shape.head_dim > MAX_HEAD_DIM {
            return Err(bad(format!("head_dim {} is over the CUDA attention kernel's {MAX_HEAD_DIM}", shape.head_dim)));
        }
        let n = (shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim).max(1);
        let stream = &self.inner.stream;
        let alloc = |_: ()| -> Result<Buf> {
            Ok(match shape.dtype {
                DType::F32 => Buf::F32(stream.alloc_zeros::<f32>(n).map_err(cuda_err("allocating the KV cache"))?),
                DType::BF16 => Buf::Bf16(stream.alloc_zeros::<u16>(n).map_err(cuda_err("allocating the KV cache"))?),
                DType::F16 => Buf::F16(stream.alloc_zeros::<u16>(n).map_err(cuda_err("allocating the KV cache"))?),
            })
        };
        Ok(CudaKvCache { shape, k: alloc(())?, v: alloc(())? })
    }

    fn write_kv(&self, cache: &mut CudaKvCache, k: &CudaTensor, v: &CudaTensor, slots: &[u32]) -> Result<()> {
        let width = cache.shape.num_kv_heads * cache.shape.head_dim;
        let capacity = cache.shape.num_blocks * cache.shape.block_size;
        if let Some(&b) = slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(bad(format!("KV slot {b} out of range (cache holds {capacity})")));
        }
        if k.cols != width || v.cols != width || k.rows != slots.len() || v.rows != slots.len() {
            return Err(bad(format!("write_kv: k {k:?}, v {v:?} for {} slots of width {width}", slots.len())));
        }
        if slots.is_empty() {
            return Ok(());
        }
        let slots_dev = self.indices("slots", slots)?;
        let (ks, vs) = (k.f32()?, v.f32()?);
        let width_i = width as i32;
        let name = format!("write_kv_{}", type_suffix(cache.k.dtype()));
        let CudaKvCache { k: kc, v: vc, .. } = cache;
        self.launch(&name, per_row(slots.len(), 256), |l| {
            l.arg(ks).arg(vs);
            push_buf(l, kc);
            push_buf(l, vc);
            l.arg(&*slots_dev).arg(&width_i);
        })
    }

    fn paged_attention(&self, q: &CudaTensor, cache: &CudaKvCache, heads: Heads, meta: &AttentionMeta) -> Result<CudaTensor> {
        let Heads { num_heads, head_dim } = heads;
        let kv_heads = cache.shape.num_kv_heads;
        if q.cols != num_heads * head_dim || head_dim != cache.shape.head_dim || num_heads % kv_heads != 0 {
            return Err(bad(format!("paged_attention: q {q:?}, heads {heads:?}, cache {:?}", cache.shape)));
        }
        let rows = q.rows;
        if meta.positions.len() != rows || meta.block_size != cache.shape.block_size {
            return Err(bad(format!("paged_attention: {} positions for {rows} rows", meta.positions.len())));
        }
        if rows == 0 {
            return self.empty(q.cols);
        }
        let mut row_seq = vec![u32::MAX; rows];
        let mut table_start = Vec::with_capacity(meta.seqs.len());
        let mut tables = Vec::new();
        for (s, seq) in meta.seqs.iter().enumerate() {
            let needed = seq.context_len.div_ceil(meta.block_size);
            if seq.block_table.len() < needed || seq.token_start + seq.num_tokens > rows {
                return Err(bad(format!("paged_attention: sequence {s} has {} blocks for {} tokens", seq.block_table.len(), seq.context_len)));
            }
            row_seq[seq.token_start..seq.token_start + seq.num_tokens].fill(s as u32);
            table_start.push(tables.len() as u32);
            tables.extend_from_slice(&seq.block_table);
        }
        // Every row belongs to a sequence and lies inside its context (the kernel trusts both).
        for (row, (&s, &p)) in row_seq.iter().zip(&meta.positions).enumerate() {
            if meta.seqs.get(s as usize).is_none_or(|seq| p as usize >= seq.context_len) {
                return Err(bad(format!("paged_attention: row {row} (position {p}) is outside every sequence's context")));
            }
        }
        let row_seq = self.indices("row_seq", &row_seq)?;
        let table_start = self.indices("table_start", &table_start)?;
        let tables = self.indices("tables", &tables)?;
        let positions = self.indices("positions", &meta.positions)?;
        let qs = q.f32()?;
        let mut out = self.alloc_f32(q.len())?;
        let ints = [num_heads, kv_heads, head_dim, meta.block_size, meta.sliding_window.unwrap_or(0)].map(|v| v as i32);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let cfg = LaunchConfig { grid_dim: (rows as u32, num_heads as u32, 1), block_dim: (ATTN_THREADS, 1, 1), shared_mem_bytes: 0 };
        self.launch(&format!("paged_attention_{}", type_suffix(cache.k.dtype())), cfg, |l| {
            l.arg(qs);
            push_buf(l, &cache.k);
            push_buf(l, &cache.v);
            l.arg(&mut out).arg(&*row_seq).arg(&*positions).arg(&*table_start).arg(&*tables);
            for v in &ints {
                l.arg(v);
            }
            l.arg(&scale);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), rows, q.cols))
    }

    fn router_top_k(&self, logits: &CudaTensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let (tokens, experts) = (logits.rows, logits.cols);
        if experts > MAX_EXPERTS || k == 0 || k > experts {
            return Err(bad(format!("router: top-{k} of {experts} experts (at most {MAX_EXPERTS})")));
        }
        if tokens == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let ls = logits.f32()?;
        let stream = &self.inner.stream;
        let mut ids = stream.alloc_zeros::<u32>(tokens * k).map_err(cuda_err("allocating router output"))?;
        let mut weights = stream.alloc_zeros::<f32>(tokens * k).map_err(cuda_err("allocating router output"))?;
        let (t_i, e_i, k_i) = (tokens as i32, experts as i32, k as i32);
        let cfg = LaunchConfig { grid_dim: (tokens.div_ceil(128).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        self.launch("router_top_k_f32", cfg, |l| {
            l.arg(ls).arg(&t_i).arg(&e_i).arg(&k_i).arg(&mut ids).arg(&mut weights);
        })?;
        let ids = stream.clone_dtoh(&ids).map_err(cuda_err("copying router choices"))?;
        let weights = stream.clone_dtoh(&weights).map_err(cuda_err("copying router weights"))?;
        Ok((ids, weights))
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[u32]) -> Result<CudaTensor> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(bad(format!("gather_rows: row {r} of {}", x.rows)));
        }
        if rows.is_empty() {
            return self.empty(x.cols);
        }
        let rows_dev = self.upload_u32(rows)?;
        let xs = x.f32()?;
        let mut out = self.alloc_f32(rows.len() * x.cols)?;
        let cols_i = x.cols as i32;
        self.launch("gather_rows_f32", per_row(rows.len(), 256), |l| {
            l.arg(xs).arg(&rows_dev).arg(&mut out).arg(&cols_i);
        })?;
        Ok(Cuda::tensor(Buf::F32(out), rows.len(), x.cols))
    }

    fn scatter_add_rows(&self, num_rows: usize, parts: &[RowsUpdate<'_, CudaTensor>]) -> Result<CudaTensor> {
        let Some(first) = parts.first() else {
            return Err(bad("scatter_add_rows with no parts".into()));
        };
        let cols = first.src.cols;
        let mut out = self.inner.stream.alloc_zeros::<f32>((num_rows * cols).max(1)).map_err(cuda_err("allocating"))?;
        let cols_i = cols as i32;
        let mut seen = vec![usize::MAX; num_rows];
        for (p, part) in parts.iter().enumerate() {
            if part.src.cols != cols || part.src.rows != part.rows.len() || part.weights.len() != part.rows.len() {
                return Err(bad(format!("scatter_add_rows: part {p} is {:?} for {} rows", part.src, part.rows.len())));
            }
            // The kernel adds each row of a part in parallel: a part's rows must be distinct.
            for &r in part.rows {
                let slot = seen.get_mut(r as usize).ok_or_else(|| bad(format!("scatter_add_rows: row {r} of {num_rows}")))?;
                if *slot == p {
                    return Err(bad(format!("scatter_add_rows: row {r} twice in part {p}")));
                }
                *slot = p;
            }
            if part.rows.is_empty() {
                continue;
            }
            let rows_dev = self.upload_u32(part.rows)?;
            let w_dev = self.upload_f32(part.weights)?;
            let src = part.src.f32()?;
            self.launch("scatter_add_rows_f32", per_row(part.rows.len(), 256), |l| {
                l.arg(&mut out).arg(src).arg(&rows_dev).arg(&w_dev).arg(&cols_i);
            })?;
        }
        Ok(Cuda::tensor(Buf::F32(out), num_rows, cols))
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let stream = &self.inner.stream;
        let mut v = match &*x.buf {
            Buf::F32(s) => stream.clone_dtoh(s).map_err(cuda_err("copying to the host"))?,
            Buf::Bf16(s) | Buf::F16(s) => {
                let n = s.len();
                let mut out = self.alloc_f32(n)?;
                let n64 = n as u64;
                self.launch(&format!("cast_{}_to_f32", type_suffix(x.buf.dtype())), elementwise(n), |l| {
                    l.arg(s).arg(&mut out).arg(&n64);
                })?;
                stream.clone_dtoh(&out).map_err(cuda_err("copying to the host"))?
            }
        };
        v.truncate(x.len());
        Ok(v)
    }

    fn upload_activations(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(bad(format!("upload_activations: {} elements for [{rows}, {cols}]", data.len())));
        }
        Ok(Cuda::tensor(Buf::F32(self.upload_f32(&data)?), rows, cols))
    }

    fn choose(&self, logits: &CudaTensor, choices: &[RowChoice<'_>]) -> Result<Vec<Option<TokenLogprobs>>> {
        let (rows, vocab) = (logits.rows, logits.cols);
        if rows != choices.len() {
            return Err(bad(format!("choose: {rows} rows of logits for {} choices", choices.len())));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        if choices.iter().any(RowChoice::adjusts) {
            // Logit bias, min_tokens and penalties are applied on the host, rows and all.
            return crate::backend::choose_on_host(self, logits, choices);
        }
        let mut words = Vec::with_capacity(rows * CHOICE_WORDS);
        for c in choices {
            words.extend(match *c {
                RowChoice::Skip => [0; CHOICE_WORDS],
                RowChoice::Score { token, top_n } => {
                    if token as usize >= vocab {
                        return Err(bad(format!("choose: token {token} outside the vocabulary ({vocab})")));
                    }
                    [1, token, 0, 0, 1f32.to_bits(), top_n as u32, 0, 0]
                }
                RowChoice::Sample { params: p, position, .. } => {
                    let u = uniform(p.seed, position).to_bits();
                    let top_n = p.logprobs.unwrap_or(0) as u32;
                    let (temperature, top_p) = (p.temperature.to_bits(), p.top_p.to_bits());
                    [2, 0, temperature, p.top_k as u32, top_p, top_n, u as u32, (u >> 32) as u32]
                }
            });
        }
        let choices_dev = self.upload_u32(&words)?;
        let stream = &self.inner.stream;
        let mut chosen = stream.alloc_zeros::<u32>(rows.max(1) * CHOSEN_WORDS).map_err(cuda_err("allocating"))?;
        let ls = logits.f32()?;
        let vocab_i = vocab as i32;
        self.launch("choose_tokens", per_row(rows, 1024), |l| {
            l.arg(ls).arg(&vocab_i).arg(&choices_dev).arg(&mut chosen);
        })?;
        let chosen = stream.clone_dtoh(&chosen).map_err(cuda_err("copying the chosen tokens"))?;
        Ok(choices
            .iter()
            .zip(chosen.chunks_exact(CHOSEN_WORDS))
            .map(|(c, w)| {
                let top_n = match *c {
                    RowChoice::Skip => return None,
                    RowChoice::Score { top_n, .. } => top_n,
                    RowChoice::Sample { params, .. } => params.logprobs.unwrap_or(0),
                }
                .min(MAX_TOP)
                .min(vocab);
                let top = w[2..2 + 2 * top_n].chunks_exact(2).map(|p| (p[0], f32::from_bits(p[1]))).collect();
                Some(TokenLogprobs { token: w[0], logprob: f32::from_bits(w[1]), top })
            })
            .collect())
    }
}

/// Device buffers the checks and benchmarks read directly.
impl CudaTensor {
    /// The tensor's f32 buffer, when it holds f32 values.
    pub fn f32_slice(&self) -> Option<&CudaSlice<f32>> {
        match &*self.buf {
            Buf::F32(s) => Some(s),
            _ => None,
        }
    }
}

// The buffers are shared between clones; make sure the type stays usable across threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<Buf>>();
};
