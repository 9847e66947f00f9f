//! The AVX2 kernels (with FMA and F16C), generic over the weight element type, for CPUs
//! without AVX-512: the sixteen canonical lanes are two eight-lane registers (lanes 0..8
//! and 8..16), so every kernel sums in the canonical order of the module docs and gives the
//! bits of the AVX-512 and portable ones.

use std::arch::x86_64::*;

use super::{Elem, Stored};

pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
}

/// Eight elements of type `S` at `p`, widened to f32 (exactly; E4M3 through f16, as in
/// the AVX-512 kernels).
///
/// # Safety
/// AVX2, FMA and F16C; `8 · S::KIND.bytes()` bytes readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<S: Stored>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees the bytes; every load is unaligned.
    unsafe {
        match S::KIND {
            Elem::F32 => _mm256_loadu_ps(p.cast()),
            Elem::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))),
            Elem::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            Elem::I8 => _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))),
            Elem::E4m3 => {
                let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p.cast()));
                let sign = _mm_slli_epi16::<8>(_mm_and_si128(b, _mm_set1_epi16(0x80)));
                let rest = _mm_slli_epi16::<7>(_mm_and_si128(b, _mm_set1_epi16(0x7F)));
                _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(sign, rest)), _mm256_set1_ps(256.0))
            }
        }
    }
}

/// Sixteen elements at element `i` of row `p`, as the (lanes 0..8, lanes 8..16) halves.
///
/// # Safety
/// As [`load8`], for sixteen elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16<S: Stored>(p: *const u8, i: usize) -> (__m256, __m256) {
    let b = S::KIND.bytes();
    // SAFETY: the caller guarantees sixteen elements.
    unsafe { (load8::<S>(p.add(i * b)), load8::<S>(p.add((i + 8) * b))) }
}

/// The canonical sum of the sixteen lanes held by `lo` and `hi`.
#[target_feature(enable = "avx2")]
fn reduce(lo: __m256, hi: __m256) -> f32 {
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds exactly sixteen f32.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    }
    super::reduce16(lanes)
}

/// Whether to prefetch at element `i`: once per 64-byte line of the weight row.
#[inline(always)]
fn line_start<S: Stored>(i: usize) -> bool {
    (i * S::KIND.bytes()).is_multiple_of(64)
}

/// The canonical dot product of weight row `w` with `x`.
///
/// # Safety
/// AVX2, FMA and F16C; `w` holds `x.len()` elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot<S: Stored>(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    assert!(w.len() >= n * S::KIND.bytes());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY (every load): i + 16 <= n bounds both rows.
        let (wl, wh) = unsafe { load16::<S>(pw, i) };
        let (xl, xh) = unsafe { (_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(px.add(i + 8))) };
        lo = _mm256_fmadd_ps(wl, xl, lo);
        hi = _mm256_fmadd_ps(wh, xh, hi);
        i += 16;
    }
    super::tail::<S>(reduce(lo, hi), w, x, i)
}

/// Canonical dot products of one weight row with four `x` rows, widening each weight
/// chunk once.
///
/// # Safety
/// AVX2, FMA and F16C; the `x` rows have equal lengths and `w` holds as many elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4<S: Stored>(w: &[u8], xs: [&[f32]; 4]) -> [f32; 4] {
    let n = xs[0].len();
    assert!(w.len() >= n * S::KIND.bytes() && xs.iter().all(|x| x.len() == n));
    let pw = w.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY (every load): i + 16 <= n bounds every row.
        let (wl, wh) = unsafe { load16::<S>(pw, i) };
        for (j, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm256_fmadd_ps(wl, unsafe { _mm256_loadu_ps(px[j].add(i)) }, acc[0]);
            acc[1] = _mm256_fmadd_ps(wh, unsafe { _mm256_loadu_ps(px[j].add(i + 8)) }, acc[1]);
        }
        i += 16;
    }
    std::array::from_fn(|j| super::tail::<S>(reduce(acc[j][0], acc[j][1]), w, xs[j], i))
}

/// Canonical dot products of four contiguous weight rows with one `x` row, prefetching the
/// next group's rows (four below) into L2 as these stream.
///
/// # Safety
/// AVX2, FMA and F16C; each `w` row holds `x.len()` elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows4<S: Stored>(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    let (n, b) = (x.len(), S::KIND.bytes());
    assert!(w.iter().all(|r| r.len() >= n * b));
    let pw = w.map(|r| r.as_ptr());
    let px = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY (every load): i + 16 <= n bounds all five rows.
        let (xl, xh) = unsafe { (_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(px.add(i + 8))) };
        let prefetch = line_start::<S>(i);
        for (a, p) in pw.iter().enumerate() {
            if prefetch {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add((i + 4 * n) * b).cast());
            }
            let (wl, wh) = unsafe { load16::<S>(*p, i) };
            acc[a][0] = _mm256_fmadd_ps(wl, xl, acc[a][0]);
            acc[a][1] = _mm256_fmadd_ps(wh, xh, acc[a][1]);
        }
        i += 16;
    }
    std::array::from_fn(|a| super::tail::<S>(reduce(acc[a][0], acc[a][1]), w[a], x, i))
}

/// Elements of `k` per pass of [`groups`]: four widened weight rows of this many f32 take
/// 16 KiB, with three x rows' chunks under 28 KiB of L1.
const K_CHUNK: usize = 1024;

/// x rows per register tile of [`groups`]: two weight rows × three x rows × two halves are
/// twelve accumulators, with a register each for the weights and the current x row.
const X_TILE: usize = 3;

/// `out[(r + a) * m + i]` = the canonical dot product of weight row `r + a` with x row
/// `i`, for `w` holding whole groups of four contiguous rows of `k` elements and `x`
/// holding `m` rows. Each group is swept over `k` in chunks: the chunk's four rows are
/// widened to f32 once (f32 rows are read in place), then every tile of three x rows
/// passes each pair of weight rows while all of it is in L1; the accumulators wait in
/// memory between chunks. Each lane sums its elements in order, so the bits are the
/// canonical ones.
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn groups<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let b = S::KIND.bytes();
    let row_bytes = k * b;
    assert!(k > 0 && w.len().is_multiple_of(4 * row_bytes) && x.len() == m * k && out.len() == w.len() / row_bytes * m);
    let k16 = k / 16 * 16;
    // acc[t][a][j] = the (lo, hi) lanes of weight row a with x row X_TILE·t + j.
    let zero = [[[_mm256_setzero_ps(); 2]; X_TILE]; 4];
    let mut acc = vec![zero; m.div_ceil(X_TILE)];
    let mut wide = vec![0f32; 4 * K_CHUNK];
    for (g, group) in w.chunks_exact(4 * row_bytes).enumerate() {
        acc.fill(zero);
        let rows: [*const u8; 4] = std::array::from_fn(|a| group[a * row_bytes..].as_ptr());
        let mut from = 0;
        while from < k16 {
            let to = (from + K_CHUNK).min(k16);
            let pw: [*const f32; 4] = if S::KIND == Elem::F32 {
                for p in rows {
                    let mut i = from;
                    while i < to {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add((i + 4 * k) * 4).cast());
                        i += 16;
                    }
                }
                rows.map(|p| p.wrapping_add(from * 4).cast())
            } else {
                for (a, &p) in rows.iter().enumerate() {
                    let mut i = from;
                    while i + 16 <= to {
                        if line_start::<S>(i) {
                            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add((i + 4 * k) * b).cast());
                        }
                        // SAFETY: i + 16 <= k16 bounds the row; the buffer holds K_CHUNK per row.
                        unsafe {
                            let (lo, hi) = load16::<S>(p, i);
                            let dst = wide.as_mut_ptr().add(a * K_CHUNK + i - from);
                            _mm256_storeu_ps(dst, lo);
                            _mm256_storeu_ps(dst.add(8), hi);
                        }
                        i += 16;
                    }
                }
                std::array::from_fn(|a| wide[a * K_CHUNK..].as_ptr())
            };
            for (t, acc) in acc.iter_mut().enumerate() {
                let first = X_TILE * t;
                // SAFETY: `pw` points at four rows of `to - from` f32, and the x rows hold
                // elements from..to; rows past `m` repeat the tile's first (their sums are dropped).
                unsafe {
                    let px: [*const f32; X_TILE] = std::array::from_fn(|j| x.as_ptr().add((if first + j < m { first + j } else { first }) * k + from));
                    for pair in 0..2 {
                        let [a, c] = &mut acc[2 * pair..2 * pair + 2] else { unreachable!() };
                        pass(pw[2 * pair], pw[2 * pair + 1], px, to - from, a, c);
                    }
                }
            }
            from = to;
        }
        for (t, acc) in acc.iter().enumerate() {
            for (a, per_x) in acc.iter().enumerate() {
                let w_row = &group[a * row_bytes..(a + 1) * row_bytes];
                for (j, lanes) in per_x.iter().enumerate() {
                    let i = X_TILE * t + j;
                    if i < m {
                        out[(4 * g + a) * m + i] = super::tail::<S>(reduce(lanes[0], lanes[1]), w_row, &x[i * k..(i + 1) * k], k16);
                    }
                }
            }
        }
    }
}

/// Adds `len` elements of f32 weight rows `w0`, `w1` times the tile's x rows to the
/// accumulators of the two weight rows (`a0[j]`, `a1[j]`: the lanes of x row `j`).
///
/// # Safety
/// AVX2 and FMA; every pointer has `len` readable f32; `len` is a multiple of 16.
#[target_feature(enable = "avx2,fma")]
unsafe fn pass(w0: *const f32, w1: *const f32, xs: [*const f32; X_TILE], len: usize, a0: &mut [[__m256; 2]; X_TILE], a1: &mut [[__m256; 2]; X_TILE]) {
    let (mut s0, mut s1) = (*a0, *a1);
    let mut i = 0;
    while i < len {
        for h in 0..2 {
            let o = i + 8 * h;
            // SAFETY (every load): o + 8 <= len bounds every row.
            let (v0, v1) = unsafe { (_mm256_loadu_ps(w0.add(o)), _mm256_loadu_ps(w1.add(o))) };
            for (j, x) in xs.iter().enumerate() {
                let y = unsafe { _mm256_loadu_ps(x.add(o)) };
                s0[j][h] = _mm256_fmadd_ps(v0, y, s0[j][h]);
                s1[j][h] = _mm256_fmadd_ps(v1, y, s1[j][h]);
            }
        }
        i += 16;
    }
    (*a0, *a1) = (s0, s1);
}
