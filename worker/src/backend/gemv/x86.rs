//! The AVX-512 kernels (and the AVX2 f32 dot product), generic over the weight element type:
//! [`load16`] widens sixteen stored elements to an f32 register, and every kernel sums in the
//! canonical order of the module docs.

use std::arch::x86_64::*;

use super::{Elem, Stored};

/// Elements ahead of the current position to prefetch: the weight row streams from
/// memory, and the hardware prefetcher alone leaves bandwidth unused.
const PREFETCH_AHEAD: usize = 1024;

pub fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Sixteen elements of type `S` at `p`, widened to f32 (exact for every type). FP8 E4M3
/// goes through f16: the byte's sign, exponent and mantissa shifted into an f16 give its
/// value times 2⁻⁸ (subnormals included), which the multiply by 256 undoes exactly.
///
/// # Safety
/// AVX-512F, AVX2 and F16C; `16 · S::KIND.bytes()` bytes readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c,fma")]
unsafe fn load16<S: Stored>(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees the bytes; every load is unaligned.
    unsafe {
        match S::KIND {
            Elem::F32 => _mm512_loadu_ps(p.cast()),
            Elem::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))),
            Elem::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            Elem::I8 => _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))),
            Elem::E4m3 => {
                let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
                let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, _mm256_set1_epi16(0x80)));
                let rest = _mm256_slli_epi16::<7>(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)));
                _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(sign, rest)), _mm512_set1_ps(256.0))
            }
        }
    }
}

/// Whether to prefetch at element `i`: once per 64-byte line of the weight row.
#[inline(always)]
fn line_start<S: Stored>(i: usize) -> bool {
    (i * S::KIND.bytes()).is_multiple_of(64)
}

/// Sixteen lanes of an AVX-512 register, reduced in the canonical order.
#[target_feature(enable = "avx512f")]
fn reduce(v: __m512) -> f32 {
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds exactly sixteen f32.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
    super::reduce16(lanes)
}

/// `[a+b per lane]` of the 128-bit quarters `A` of `a` and `B` of `b` picked by
/// `_mm512_shuffle_f32x4` selectors: one step of the canonical tree for two registers.
#[inline(always)]
fn fold_quarters<const A: i32, const B: i32>(a: __m512, b: __m512) -> __m512 {
    // SAFETY: shuffles and adds on registers; callers enable AVX-512F.
    unsafe { _mm512_add_ps(_mm512_shuffle_f32x4::<A>(a, b), _mm512_shuffle_f32x4::<B>(a, b)) }
}

/// One step of the canonical tree inside every 128-bit quarter of two registers.
#[inline(always)]
fn fold_lanes<const A: i32, const B: i32>(a: __m512, b: __m512) -> __m512 {
    // SAFETY: as above.
    unsafe { _mm512_add_ps(_mm512_shuffle_ps::<A>(a, b), _mm512_shuffle_ps::<B>(a, b)) }
}

/// The canonical reduction of sixteen registers at once, with register shuffles
/// instead of sixteen stores and scalar trees. Every step adds lane `l` and lane
/// `l + half` of the same register, as [`super::reduce16`] does, so the bits are the
/// same. Lane `4q + e` of the result is the sum of `v[4e + q]`.
#[target_feature(enable = "avx512f")]
fn reduce16x16(v: [__m512; 16]) -> __m512 {
    // half = 8: [v.lo256 + v.hi256 | w.lo256 + w.hi256].
    let w: [__m512; 8] = std::array::from_fn(|p| fold_quarters::<0b01_00_01_00, 0b11_10_11_10>(v[2 * p], v[2 * p + 1]));
    // half = 4: quarter q of x[p] holds register 4p + q.
    let x: [__m512; 4] = std::array::from_fn(|p| fold_quarters::<0b10_00_10_00, 0b11_01_11_01>(w[2 * p], w[2 * p + 1]));
    // half = 2 and half = 1, inside each quarter.
    let y: [__m512; 2] = std::array::from_fn(|p| fold_lanes::<0b01_00_01_00, 0b11_10_11_10>(x[2 * p], x[2 * p + 1]));
    fold_lanes::<0b10_00_10_00, 0b11_01_11_01>(y[0], y[1])
}

/// The canonical reductions of a 4 × 4 tile of accumulators.
#[target_feature(enable = "avx512f")]
fn reduce4x4(acc: [[__m512; 4]; 4]) -> [[f32; 4]; 4] {
    // Register 4j + a is acc[a][j], so lane 4a + j is its sum: row-major [a][j].
    let sums = reduce16x16(std::array::from_fn(|r| acc[r % 4][r / 4]));
    let mut out = [[0f32; 4]; 4];
    // SAFETY: `out` is sixteen contiguous f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr().cast(), sums) };
    out
}

/// The canonical reductions of four accumulators.
#[target_feature(enable = "avx512f")]
fn reduce4(acc: [__m512; 4]) -> [f32; 4] {
    let zero = _mm512_setzero_ps();
    // Registers 0, 4, 8, 12 land in lanes 0, 1, 2, 3.
    let sums = reduce16x16(std::array::from_fn(|r| if r % 4 == 0 { acc[r / 4] } else { zero }));
    let mut all = [0f32; 16];
    // SAFETY: `all` holds sixteen f32.
    unsafe { _mm512_storeu_ps(all.as_mut_ptr(), sums) };
    [all[0], all[1], all[2], all[3]]
}

/// The canonical dot product of weight row `w` with `x`, prefetching `w` ahead of use.
///
/// # Safety
/// AVX-512F, AVX2, F16C and FMA; `w` holds `x.len()` elements.
#[target_feature(enable = "avx512f,avx2,f16c,fma")]
pub unsafe fn dot_avx512<S: Stored>(w: &[u8], x: &[f32]) -> f32 {
    let (n, b) = (x.len(), S::KIND.bytes());
    assert!(w.len() >= n * b);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // Prefetching never faults, so addresses past the end of `w` are harmless.
        if i % 64 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add((i + PREFETCH_AHEAD) * b).cast());
        }
        // SAFETY: i + 16 <= n bounds both rows.
        let (wv, xv) = unsafe { (load16::<S>(pw.add(i * b)), _mm512_loadu_ps(px.add(i))) };
        acc = _mm512_fmadd_ps(wv, xv, acc);
        i += 16;
    }
    super::tail::<S>(reduce(acc), w, x, i)
}

/// Canonical dot products of one weight row with four `x` rows, loading each weight
/// chunk once.
///
/// # Safety
/// AVX-512F, AVX2, F16C and FMA; the `x` rows have equal lengths and `w` holds as many elements.
#[target_feature(enable = "avx512f,avx2,f16c,fma")]
pub unsafe fn dot4_avx512<S: Stored>(w: &[u8], xs: [&[f32]; 4]) -> [f32; 4] {
    let (n, b) = (xs[0].len(), S::KIND.bytes());
    assert!(w.len() >= n * b && xs.iter().all(|x| x.len() == n));
    let pw = w.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 16 <= n {
        if i % 64 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add((i + PREFETCH_AHEAD) * b).cast());
        }
        // SAFETY: i + 16 <= n bounds every row.
        let wv = unsafe { load16::<S>(pw.add(i * b)) };
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            *acc = _mm512_fmadd_ps(wv, unsafe { _mm512_loadu_ps(px[j].add(i)) }, *acc);
        }
        i += 16;
    }
    std::array::from_fn(|j| super::tail::<S>(reduce(acc[j]), w, xs[j], i))
}

/// Canonical dot products of four weight rows with one `x` row. The rows are contiguous
/// (a group), so the next group's rows, four below, are prefetched into L2 as these stream
/// (the hardware prefetcher stops at every 4 KiB page).
///
/// # Safety
/// AVX-512F, AVX2, F16C and FMA; each `w` row holds `x.len()` elements.
#[target_feature(enable = "avx512f,avx2,f16c,fma")]
pub unsafe fn rows4_avx512<S: Stored>(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    let (n, b) = (x.len(), S::KIND.bytes());
    assert!(w.iter().all(|r| r.len() >= n * b));
    let pw = w.map(|r| r.as_ptr());
    let px = x.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY (every load): i + 16 <= n bounds all five rows.
        let xv = unsafe { _mm512_loadu_ps(px.add(i)) };
        let prefetch = line_start::<S>(i);
        for (a, p) in pw.iter().enumerate() {
            if prefetch {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add((i + 4 * n) * b).cast());
            }
            acc[a] = _mm512_fmadd_ps(unsafe { load16::<S>(p.add(i * b)) }, xv, acc[a]);
        }
        i += 16;
    }
    let mut out = reduce4(acc);
    if i < n {
        for (a, o) in out.iter_mut().enumerate() {
            *o = super::tail::<S>(*o, w[a], x, i);
        }
    }
    out
}

/// Elements of `k` per pass of [`groups_avx512`]: a group of four weight rows and a tile
/// of four x rows of this many elements take 24 KiB, half of L1.
const K_CHUNK: usize = 768;

/// `out[(r + a) * m + i]` = the canonical dot product of weight row `r + a` with x row
/// `i`, for `w` holding whole groups of four contiguous rows of `k` elements and `x`
/// holding `m` rows. Each group is swept over `k` in chunks, every x row passing the
/// group's chunk while both are in L1; the accumulators wait in memory between chunks.
/// Weights of other types than f32 are widened once per chunk into an L1 buffer that every
/// x tile then reads. Each lane still sums its elements in order, so the bits are the
/// canonical ones.
///
/// # Safety
/// AVX-512F, AVX2, F16C and FMA.
#[target_feature(enable = "avx512f,avx2,f16c,fma")]
pub unsafe fn groups_avx512<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let b = S::KIND.bytes();
    let row_bytes = k * b;
    assert!(k > 0 && w.len().is_multiple_of(4 * row_bytes) && x.len() == m * k && out.len() == w.len() / row_bytes * m);
    let k16 = k / 16 * 16;
    let zero = [[_mm512_setzero_ps(); 4]; 4];
    let mut acc = vec![zero; m.div_ceil(4)];
    let mut wide = vec![0f32; 4 * K_CHUNK];
    for (g, group) in w.chunks_exact(4 * row_bytes).enumerate() {
        acc.fill(zero);
        let rows: [*const u8; 4] = std::array::from_fn(|a| group[a * row_bytes..].as_ptr());
        let mut from = 0;
        while from < k16 {
            let to = (from + K_CHUNK).min(k16);
            // The chunk's four weight rows as f32, and whether the first tile prefetches.
            let (pw, prefetch): ([*const f32; 4], bool) = if S::KIND == Elem::F32 {
                (rows.map(|p| p.wrapping_add(from * 4).cast()), true)
            } else {
                for (a, &p) in rows.iter().enumerate() {
                    let mut i = from;
                    while i + 16 <= to {
                        if line_start::<S>(i) {
                            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add((i + 4 * k) * b).cast());
                        }
                        // SAFETY: i + 16 <= k16 bounds the row; the buffer holds K_CHUNK per row.
                        unsafe { _mm512_storeu_ps(wide.as_mut_ptr().add(a * K_CHUNK + i - from), load16::<S>(p.add(i * b))) };
                        i += 16;
                    }
                }
                (std::array::from_fn(|a| wide[a * K_CHUNK..].as_ptr()), false)
            };
            for (t, acc) in acc.iter_mut().enumerate() {
                let tile = 4 * t..(4 * t + 4).min(m);
                let prefetch = (prefetch && t == 0).then_some(4 * k);
                // SAFETY: `pw` points at four rows of `to - from` f32 (the group's rows or
                // the buffer), and the tile's x rows hold elements from..to.
                unsafe {
                    let px = |j: usize| x.as_ptr().add((tile.start + j) * k + from);
                    match tile.len() {
                        4 => pass::<4>(pw, [px(0), px(1), px(2), px(3)], to - from, prefetch, acc),
                        3 => pass::<3>(pw, [px(0), px(1), px(2)], to - from, prefetch, acc),
                        2 => pass::<2>(pw, [px(0), px(1)], to - from, prefetch, acc),
                        _ => pass::<1>(pw, [px(0)], to - from, prefetch, acc),
                    }
                }
            }
            from = to;
        }
        for (t, acc) in acc.iter().enumerate() {
            let sums = reduce4x4(*acc);
            for (a, sums) in sums.into_iter().enumerate() {
                let w_row = &group[a * row_bytes..(a + 1) * row_bytes];
                for (i, sum) in (4 * t..m).zip(sums) {
                    out[(4 * g + a) * m + i] = super::tail::<S>(sum, w_row, &x[i * k..(i + 1) * k], k16);
                }
            }
        }
    }
}

/// Adds `len` elements of four f32 weight rows times `R` x rows to `acc[a][j]`,
/// prefetching what lies `prefetch` elements past each weight row's position when asked.
///
/// # Safety
/// AVX-512F; `pw` and `px` point at `len` readable f32 each; `len` is a multiple of 16.
#[target_feature(enable = "avx512f")]
unsafe fn pass<const R: usize>(pw: [*const f32; 4], px: [*const f32; R], len: usize, prefetch: Option<usize>, acc: &mut [[__m512; 4]; 4]) {
    let mut sums = *acc;
    let mut i = 0;
    while i + 16 <= len {
        // SAFETY (every load): i + 16 <= len bounds every row.
        let wv = pw.map(|p| unsafe { _mm512_loadu_ps(p.add(i)) });
        if let Some(ahead) = prefetch {
            for p in pw {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(i + ahead).cast());
            }
        }
        for (j, p) in px.iter().enumerate() {
            let xv = unsafe { _mm512_loadu_ps(p.add(i)) };
            for a in 0..4 {
                sums[a][j] = _mm512_fmadd_ps(wv[a], xv, sums[a][j]);
            }
        }
        i += 16;
    }
    *acc = sums;
}

/// The canonical dot product of an f32 weight row with `x`, with AVX2/FMA: two
/// eight-lane accumulators are lanes 0..8 and 8..16 of the sixteen.
///
/// # Safety
/// AVX2 and FMA; `w` holds `x.len()` f32.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_avx2(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    assert!(w.len() >= n * 4);
    let (pa, pb) = (w.as_ptr().cast::<f32>(), x.as_ptr());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY (for every load below): i + 16 <= n bounds both rows; loads are unaligned.
    while i + 16 <= n {
        let (x0, y0) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
        let (x1, y1) = unsafe { (_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8))) };
        lo = _mm256_fmadd_ps(x0, y0, lo);
        hi = _mm256_fmadd_ps(x1, y1, hi);
        i += 16;
    }
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds exactly sixteen f32.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    }
    super::tail::<super::F32>(super::reduce16(lanes), w, x, i)
}
