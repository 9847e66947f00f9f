//! The product kernel: `x · Wᵀ` for f32 rows of `x` against a weight matrix stored `[n, k]`
//! in any of the engine's weight element types ([`Elem`]: f32, bf16, f16, int8, FP8 E4M3).
//! Decoding reads every weight once per step, so this is memory-bound: each weight row is
//! streamed from memory once, widened to f32 in registers (exactly: every element type is a
//! subset of f32), kept in L1 while a block of `x` rows is dotted with it, and the rows of
//! `W` are split across threads in contiguous runs. Accumulation is always f32.
//!
//! Batch invariance: every dot product, whichever kernel computes it (one row, four rows, a
//! 4 × 4 tile, AVX-512, AVX2 or portable), sums in one canonical order: sixteen lanes, lane
//! `l` accumulating elements `l, l + 16, ...` with fused multiply-adds, then a fixed tree
//! (lane `l` += lane `l + 8`, `+ 4`, `+ 2`, `+ 1`), then the tail in order, fused. So a
//! token's result does not depend on the batch it runs in, prefill or decode: a sequence
//! recomputed elsewhere (moved off a failed replica) continues with the same tokens. As the
//! widening is exact, a bf16 or f16 matrix gives the same bits as its f32 copy would.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod x86;

/// How the elements of a weight matrix are stored. Each widens to f32 exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    Bf16,
    F16,
    /// Signed 8-bit integers (the values of a scaled int8 matrix).
    I8,
    /// FP8 E4M3 (`float8_e4m3fn`: bias 7, no infinities, `0x7F`/`0xFF` NaN, max 448).
    E4m3,
}

/// The element type that stores a dense dtype.
impl From<cluster::device::DType> for Elem {
    fn from(d: cluster::device::DType) -> Self {
        match d {
            cluster::device::DType::F32 => Elem::F32,
            cluster::device::DType::F16 => Elem::F16,
            cluster::device::DType::BF16 => Elem::Bf16,
        }
    }
}

impl Elem {
    pub const fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 | Elem::F16 => 2,
            Elem::I8 | Elem::E4m3 => 1,
        }
    }

    /// Element `i` of `row`, widened to f32.
    #[inline]
    pub fn get(self, row: &[u8], i: usize) -> f32 {
        match self {
            Elem::F32 => f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]),
            Elem::Bf16 => f32::from_bits((u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32) << 16),
            Elem::F16 => half::f16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32(),
            Elem::I8 => row[i] as i8 as f32,
            Elem::E4m3 => E4M3_VALUES[row[i] as usize],
        }
    }
}

/// Every FP8 E4M3 value by its byte: `e = 0` is ±m·2⁻⁹, otherwise ±(1 + m/8)·2^(e − 7).
pub static E4M3_VALUES: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let (e, m) = ((b >> 3) & 0xF, b & 7);
        let magnitude = if b & 0x7F == 0x7F {
            f32::NAN
        } else if e == 0 {
            m as f32 / 512.0
        } else {
            let mut v = (8 + m) as f32 / 8.0;
            let mut p = e as i32 - 7;
            while p > 0 {
                v *= 2.0;
                p -= 1;
            }
            while p < 0 {
                v /= 2.0;
                p += 1;
            }
            v
        };
        t[b] = if b & 0x80 != 0 { -magnitude } else { magnitude };
        b += 1;
    }
    t
};

/// A weight element type as a type, so each kernel is compiled once per type.
pub(crate) trait Stored: Send + Sync + 'static {
    const KIND: Elem;
}

macro_rules! stored {
    ($($name:ident),*) => {$(
        pub(crate) struct $name;
        impl Stored for $name {
            const KIND: Elem = Elem::$name;
        }
    )*};
}
stored!(F32, Bf16, F16, I8, E4m3);

/// Rows of `W` per parallel task: large enough to amortise scheduling, small enough to
/// balance two or more threads on the smallest projections.
const ROWS_PER_TASK: usize = 64;

/// Rows of `x` dotted with each weight row while it stays in L1.
const X_ROWS_PER_BLOCK: usize = 64;

/// `out[i, j] = dot(x[i, :], w[j, :])` for `x: [m, k]`, f32 `w: [n, k]`; returns `[m, n]`.
pub fn gemv_f32(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    // SAFETY: any initialised memory may be viewed as bytes (u8 has alignment 1).
    let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), std::mem::size_of_val(w)) };
    matmul_t(x, bytes, Elem::F32, m, n, k)
}

/// `out[i, j] = dot(x[i, :], w[j, :])` for `x: [m, k]` and `w: [n, k]` stored as `elem`
/// (little-endian bytes, any alignment); returns `[m, n]`.
pub fn matmul_t(x: &[f32], w: &[u8], elem: Elem, m: usize, n: usize, k: usize) -> Vec<f32> {
    match elem {
        Elem::F32 => product::<F32>(x, w, m, n, k),
        Elem::Bf16 => product::<Bf16>(x, w, m, n, k),
        Elem::F16 => product::<F16>(x, w, m, n, k),
        Elem::I8 => product::<I8>(x, w, m, n, k),
        Elem::E4m3 => product::<E4m3>(x, w, m, n, k),
    }
}

fn product<S: Stored>(x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k * S::KIND.bytes(), "w is not [n, k]");
    if m <= X_ROWS_PER_BLOCK {
        return block::<S>(x, w, m, n, k);
    }
    let mut out = Vec::with_capacity(m * n);
    for rows in x.chunks(X_ROWS_PER_BLOCK * k) {
        out.extend(block::<S>(rows, w, rows.len() / k, n, k));
    }
    out
}

fn block<S: Stored>(x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let kernels = Kernels::<S>::select();
    let arranged = (kernels.arrange)(x, k);
    let x = arranged.as_deref().unwrap_or(x);
    let row_bytes = k * S::KIND.bytes();
    out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let w_rows = |r: usize| &w[(first + r) * row_bytes..(first + r + 1) * row_bytes];
        let x_row = |i: usize| &x[i * k..(i + 1) * k];
        let rows = out.len() / m;
        if let Some((few, most)) = kernels.few
            && m <= most
        {
            return few(&w[first * row_bytes..(first + rows) * row_bytes], x, m, k, out);
        }
        // Whole groups of four weight rows: one x row streams past them (four independent
        // sums keep the FMA units busy); two or more go through the blocked kernel.
        let whole = rows / 4 * 4;
        if m == 1 {
            for r in (0..whole).step_by(4) {
                out[r..r + 4].copy_from_slice(&(kernels.rows4)([w_rows(r), w_rows(r + 1), w_rows(r + 2), w_rows(r + 3)], x));
            }
        } else {
            (kernels.groups)(&w[first * row_bytes..(first + whole) * row_bytes], x, m, k, &mut out[..whole * m]);
        }
        for r in whole..rows {
            let out_row = &mut out[r * m..(r + 1) * m];
            let mut i = 0;
            while i + 4 <= m {
                out_row[i..i + 4].copy_from_slice(&(kernels.dot4)(w_rows(r), [x_row(i), x_row(i + 1), x_row(i + 2), x_row(i + 3)]));
                i += 4;
            }
            for (i, o) in out_row.iter_mut().enumerate().skip(i) {
                *o = (kernels.dot)(w_rows(r), x_row(i));
            }
        }
    });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// A product of contiguous weight rows (`w`, rows of `k`) with the `m` rows of `x`, written
/// `out[r * m + i]`: `(w, x, m, k, out)`.
type Product = fn(&[u8], &[f32], usize, usize, &mut [f32]);

/// The kernels for one element type, chosen for this CPU. Weight rows are byte slices of
/// `k` elements; `x` rows are f32, as [`Kernels::arrange`] leaves them.
struct Kernels<S> {
    /// `x` (rows of `k`) in the element order these kernels read, where that is not the
    /// order it is in (the AVX2 bf16 kernels read each chunk's even elements first).
    arrange: fn(&[f32], usize) -> Option<Vec<f32>>,
    /// The products of a run of contiguous weight rows with at most `.1` rows of `x`, the
    /// weights streamed once (`out[r * m + i]`), where a set has such a kernel.
    few: Option<(Product, usize)>,
    dot: fn(&[u8], &[f32]) -> f32,
    dot4: fn(&[u8], [&[f32]; 4]) -> [f32; 4],
    rows4: fn([&[u8]; 4], &[f32]) -> [f32; 4],
    /// The products of whole groups of four contiguous weight rows (`w`, rows of `k`) with
    /// the `m` rows of `x`, written `out[r * m + i]`.
    groups: Product,
    _stored: std::marker::PhantomData<S>,
}

impl<S: Stored> Kernels<S> {
    /// The fastest set this CPU runs.
    fn select() -> Self {
        Self::avx512().or_else(Self::avx2).unwrap_or_else(Self::portable)
    }

    /// The AVX-512 kernels, where the CPU has AVX-512F, AVX2, F16C and FMA.
    fn avx512() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512() {
                return Some(Kernels {
                    arrange: |_, _| None,
                    few: None,
                    // SAFETY (all four): the CPU supports AVX-512F, AVX2, F16C and FMA (checked just above).
                    dot: |w, x| unsafe { x86::dot_avx512::<S>(w, x) },
                    dot4: |w, xs| unsafe { x86::dot4_avx512::<S>(w, xs) },
                    rows4: |w, x| unsafe { x86::rows4_avx512::<S>(w, x) },
                    groups: |w, x, m, k, out| unsafe { x86::groups_avx512::<S>(w, x, m, k, out) },
                    _stored: std::marker::PhantomData,
                });
            }
        }
        None
    }

    /// The AVX2 kernels, where the CPU has AVX2, FMA and F16C.
    fn avx2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                return Some(Kernels {
                    arrange: avx2::arrange::<S>,
                    // SAFETY (all five): the CPU supports AVX2, FMA and F16C (checked just above).
                    few: Some((|w, x, m, k, out| unsafe { avx2::few::<S>(w, x, m, k, out) }, avx2::few_most::<S>())),
                    dot: |w, x| unsafe { avx2::dot::<S>(w, x) },
                    dot4: |w, xs| unsafe { avx2::dot4::<S>(w, xs) },
                    rows4: |w, x| unsafe { avx2::rows4::<S>(w, x) },
                    groups: |w, x, m, k, out| unsafe { avx2::groups::<S>(w, x, m, k, out) },
                    _stored: std::marker::PhantomData,
                });
            }
        }
        None
    }

    /// Portable code (with the AVX2 f32 dot product where the CPU has it).
    fn portable() -> Self {
        Kernels {
            arrange: |_, _| None,
            few: None,
            dot: select_dot::<S>(),
            dot4: |w, xs| xs.map(|x| select_dot::<S>()(w, x)),
            rows4: |w, x| w.map(|row| select_dot::<S>()(row, x)),
            groups: groups_portable::<S>,
            _stored: std::marker::PhantomData,
        }
    }
}

/// The blocked products in portable code: each weight row against each x row.
fn groups_portable<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let dot = select_dot::<S>();
    let row_bytes = k * S::KIND.bytes();
    for (r, w_row) in w.chunks_exact(row_bytes.max(1)).enumerate() {
        for i in 0..m {
            out[r * m + i] = dot(w_row, &x[i * k..(i + 1) * k]);
        }
    }
}

fn select_dot<S: Stored>() -> fn(&[u8], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if S::KIND == Elem::F32 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return |w, x| {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { x86::dot_f32_avx2(w, x) }
            };
        }
    }
    dot_portable::<S>
}

/// The canonical tree over sixteen lane sums (see the module docs).
#[inline]
fn reduce16(mut lanes: [f32; 16]) -> f32 {
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            lanes[l] += lanes[l + half];
        }
    }
    lanes[0]
}

/// The tail of a dot product from element `from` of the weight row on, in order, fused.
#[inline]
fn tail<S: Stored>(mut sum: f32, w: &[u8], x: &[f32], from: usize) -> f32 {
    for (i, &xv) in x.iter().enumerate().skip(from) {
        sum = S::KIND.get(w, i).mul_add(xv, sum);
    }
    sum
}

/// The canonical dot product in portable code (`mul_add` is a fused multiply-add).
fn dot_portable<S: Stored>(w: &[u8], x: &[f32]) -> f32 {
    let full = x.len() / 16 * 16;
    let mut acc = [0f32; 16];
    for c in (0..full).step_by(16) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = S::KIND.get(w, c + l).mul_add(x[c + l], *a);
        }
    }
    tail::<S>(reduce16(acc), w, x, full)
}

#[cfg(test)]
mod tests;
