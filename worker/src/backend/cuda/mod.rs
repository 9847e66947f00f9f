//! The CUDA backend, on cudarc with the libraries loaded at run time (it builds without
//! CUDA). Weights and the KV cache are f32, bf16 or f16; activations are f32. Products go
//! through cuBLAS (`cublasGemmEx`, f32 accumulation), except small-batch products against
//! 2-byte weights, which use a bandwidth-bound kernel of our own. Everything else runs in
//! kernels compiled at start with NVRTC (`kernels.cu`), on one stream: the host only waits
//! where a result must come back (router choices, chosen tokens, host copies).

mod ops;

pub use ops::Product;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg};

use super::DType;
use crate::error::{EngineError, Result};

/// The kernels' source, compiled once per backend.
const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel the backend launches (instantiations per element type included).
const KERNELS: &[&str] = &[
    "add_f32",
    "silu_mul_f32",
    "rms_norm_f32",
    "rope_f32",
    "gather_rows_f32",
    "scatter_add_rows_f32",
    "router_top_k_f32",
    "choose_tokens",
    "gemv_small_bf16",
    "gemv_small_f16",
    "gemv_swiglu_bf16",
    "gemv_swiglu_f16",
    "add_rms_norm_f32",
    "cast_f32_to_bf16",
    "cast_f32_to_f16",
    "split_f32_to_bf16",
    "split_f32_to_f16",
    "add_halves_f32",
    "cast_bf16_to_f32",
    "cast_f16_to_f32",
    "embedding_f32",
    "embedding_bf16",
    "embedding_f16",
    "write_kv_f32",
    "write_kv_bf16",
    "write_kv_f16",
    "paged_attention_f32",
    "paged_attention_bf16",
    "paged_attention_f16",
];

/// Fails with a clear error, instead of cudarc's panic, where a CUDA library is missing.
pub fn check_libraries() -> Result<()> {
    // SAFETY: these only try to open the shared libraries.
    let present = unsafe {
        [
            ("the CUDA driver library (libcuda)", cudarc::driver::sys::is_culib_present()),
            ("NVRTC (libnvrtc)", cudarc::nvrtc::sys::is_culib_present()),
            ("cuBLAS (libcublas)", cudarc::cublas::sys::is_culib_present()),
        ]
    };
    match present.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => {
            Err(EngineError::Backend(format!("{name} is not present on this machine (the CUDA backend loads it at run time; set LD_LIBRARY_PATH)")))
        }
        None => Ok(()),
    }
}

pub(crate) fn cuda_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> EngineError {
    move |e| EngineError::Backend(format!("CUDA: {what}: {e}"))
}

/// Device memory of one tensor.
pub enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    F16(CudaSlice<u16>),
}

impl Buf {
    pub fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::Bf16(_) => DType::BF16,
            Buf::F16(_) => DType::F16,
        }
    }
}

/// A 2-D `[rows, cols]` tensor on the GPU. Clones share the memory.
#[derive(Clone)]
pub struct CudaTensor {
    buf: Arc<Buf>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor[{}, {}] {}", self.rows, self.cols, self.buf.dtype())
    }
}

impl CudaTensor {
    fn f32(&self) -> Result<&CudaSlice<f32>> {
        match &*self.buf {
            Buf::F32(s) => Ok(s),
            other => Err(EngineError::Backend(format!("expected f32 activations, got {}", other.dtype()))),
        }
    }

    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// One layer's paged cache: `[slots, kv_heads * head_dim]` for K and for V.
pub struct CudaKvCache {
    shape: super::KvShape,
    k: Buf,
    v: Buf,
}

/// Host index arrays of the current step, uploaded once and reused by every layer.
#[derive(Default)]
struct Uploads {
    by_purpose: HashMap<&'static str, (Vec<u32>, Arc<CudaSlice<u32>>)>,
}

pub struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<String, CudaFunction>,
    uploads: Mutex<Uploads>,
    device_name: String,
}

/// The CUDA backend on one GPU. Clones share the context, stream and kernels.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({})", self.inner.device_name)
    }
}

/// Compiles the kernels to PTX for compute capability `arch` (e.g. `compute_90`).
pub fn compile_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            EngineError::Backend(format!("NVRTC could not compile the kernels:\n{}", log.to_string_lossy()))
        }
        other => EngineError::Backend(format!("NVRTC: {other}")),
    })
}

/// The PTX virtual architecture to compile for: the newest one at or below the device that
/// every NVRTC from CUDA 12.0 on knows (PTX runs on later devices through the driver's JIT).
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (..=7, _) => "compute_75",
        (8, 0) => "compute_80",
        (8, _) => "compute_86",
        _ => "compute_90",
    }
}

/// Each step allocates its activations from the device's memory pool and synchronizes once
/// (the chosen tokens come back); by default the pool returns its free memory to the driver
/// at every synchronization, so each step would map it again. Keep it.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    let mut threshold = u64::MAX;
    with_pool(ctx, "configuring the memory pool", |pool| {
        // SAFETY: the pool is the device's; the call reads the given value.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
        }
    })
}

/// Runs `f` on the device's default memory pool.
fn with_pool(ctx: &CudaContext, what: &str, f: impl FnOnce(cudarc::driver::sys::CUmemoryPool) -> cudarc::driver::sys::CUresult) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: the device handle is live; the call writes the pool handle.
    let status = match unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) } {
        sys::CUresult::CUDA_SUCCESS => f(pool),
        other => other,
    };
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(EngineError::Backend(format!("CUDA: {what}: {other:?}"))),
    }
}

impl Cuda {
    /// Opens GPU `ordinal`, compiles the kernels and starts cuBLAS.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the GPU"))?;
        // One stream does all the work, so cudarc's per-buffer event tracking is not needed.
        // SAFETY: called before any buffer exists; all work is ordered on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        if ctx.has_async_alloc() {
            keep_pool_memory(&ctx)?;
        }
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("reading the compute capability"))?;
        let ptx = compile_kernels(arch_name(major, minor))?;
        let module = ctx.load_module(ptx).map_err(|e| {
            EngineError::Backend(format!(
                "CUDA: loading the kernels: {e} (NVRTC's PTX must be no newer than the driver's CUDA version: \
                 put a matching libnvrtc first on LD_LIBRARY_PATH)"
            ))
        })?;
        let mut kernels = HashMap::new();
        for &name in KERNELS {
            kernels.insert(name.to_string(), module.load_function(name).map_err(cuda_err("finding a kernel"))?);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err("starting cuBLAS"))?;
        let device_name = ctx.name().map_err(cuda_err("reading the device name"))?;
        Ok(Cuda { inner: Arc::new(Inner { ctx, stream, blas, kernels, uploads: Mutex::new(Uploads::default()), device_name }) })
    }

    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        self.inner.ctx.mem_get_info().map_err(cuda_err("reading the free memory"))
    }

    /// Gives the memory pool's free memory back to the driver (for other processes), once
    /// the queued work is done.
    pub fn release_free_memory(&self) -> Result<()> {
        self.synchronize()?;
        if !self.inner.ctx.has_async_alloc() {
            return Ok(());
        }
        // SAFETY: the pool is the device's; trimming only unmaps memory no allocation holds.
        with_pool(&self.inner.ctx, "trimming the memory pool", |pool| unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) })
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(cuda_err("synchronizing"))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    fn bind(&self) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(cuda_err("binding the context"))
    }

    fn launch<'a>(&'a self, name: &str, cfg: LaunchConfig, push: impl FnOnce(&mut LaunchArgs<'a>)) -> Result<()> {
        let kernel = self.inner.kernels.get(name).ok_or_else(|| EngineError::Backend(format!("no kernel {name}")))?;
        let mut args = self.inner.stream.launch_builder(kernel);
        push(&mut args);
        // SAFETY: every kernel's arguments are pushed in the order and types kernels.cu
        // declares, and the buffers hold the sizes the launch covers (checked by callers).
        unsafe { args.launch(cfg) }.map_err(cuda_err("launching a kernel"))?;
        Ok(())
    }

    /// Device memory for `n` f32 values, uninitialised (every caller writes all of it).
    fn alloc_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: the kernels that take this buffer write every element before any read.
        unsafe { self.inner.stream.alloc::<f32>(n.max(1)) }.map_err(cuda_err("allocating device memory"))
    }

    fn tensor(buf: Buf, rows: usize, cols: usize) -> CudaTensor {
        CudaTensor { buf: Arc::new(buf), rows, cols }
    }

    /// `data` on the device, re-using the last upload made for `purpose` when it is equal
    /// (a step's positions, slots and block tables serve every layer).
    fn indices(&self, purpose: &'static str, data: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut uploads = self.inner.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((host, dev)) = uploads.by_purpose.get(purpose)
            && host.as_slice() == data
        {
            return Ok(dev.clone());
        }
        let dev = Arc::new(self.upload_u32(data)?);
        uploads.by_purpose.insert(purpose, (data.to_vec(), dev.clone()));
        Ok(dev)
    }

    /// `data` on the device (one element at least: CUDA allocates nothing for zero).
    fn upload_u32(&self, data: &[u32]) -> Result<CudaSlice<u32>> {
        let padded: &[u32] = if data.is_empty() { &[0] } else { data };
        self.inner.stream.clone_htod(padded).map_err(cuda_err("uploading indices"))
    }
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `threads` per row.
fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Pushes a buffer of any element type as a kernel argument.
fn push_buf<'a>(args: &mut LaunchArgs<'a>, buf: &'a Buf) {
    match buf {
        Buf::F32(s) => args.arg(s),
        Buf::Bf16(s) | Buf::F16(s) => args.arg(s),
    };
}

fn type_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: where it is installed the kernels must compile and export every
    /// kernel the backend looks up; where it is not, the backend must say which library is
    /// missing instead of panicking.
    #[test]
    fn kernels_compile_or_the_missing_library_is_named() {
        // SAFETY: only tries to open the library.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            for arch in ["compute_80", "compute_90"] {
                let ptx = compile_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}")).to_src();
                for name in KERNELS {
                    assert!(ptx.contains(&format!(".entry {name}(")), "{arch}: kernel {name} missing from the PTX");
                }
            }
        } else {
            let err = check_libraries().expect_err("NVRTC is missing").to_string();
            assert!(err.contains("not present"), "{err}");
        }
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            let err = Cuda::new(0).expect_err("no driver here").to_string();
            assert!(err.contains("libcuda") && err.contains("not present"), "{err}");
        }
    }
}
