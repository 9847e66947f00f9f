//! The f32 product kernel: `x · Wᵀ` for rows of `x` against an f32 weight matrix stored
//! `[n, k]`. Decoding reads every weight once per step, so this is memory-bound: each
//! weight row is streamed from memory once, kept in L1 while a block of `x` rows is dotted
//! with it, and the rows of `W` are split across threads in contiguous runs.
//!
//! Batch invariance: every dot product, whichever kernel computes it (one row, four rows, a
//! 4 × 4 tile, AVX-512, AVX2 or portable), sums in one canonical order: sixteen lanes, lane
//! `l` accumulating elements `l, l + 16, ...` with fused multiply-adds, then a fixed tree
//! (lane `l` += lane `l + 8`, `+ 4`, `+ 2`, `+ 1`), then the tail in order, fused. So a
//! token's result does not depend on the batch it runs in, prefill or decode: a sequence
//! recomputed elsewhere (moved off a failed replica) continues with the same tokens.

use rayon::prelude::*;

/// Rows of `W` per parallel task: large enough to amortise scheduling, small enough to
/// balance two or more threads on the smallest projections.
const ROWS_PER_TASK: usize = 64;

/// Rows of `x` dotted with each weight row while it stays in L1.
const X_ROWS_PER_BLOCK: usize = 64;

/// `out[i, j] = dot(x[i, :], w[j, :])` for `x: [m, k]`, `w: [n, k]`; returns `[m, n]`.
pub fn gemv_f32(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    if m <= X_ROWS_PER_BLOCK {
        return gemv_block(x, w, m, n, k);
    }
    let mut out = Vec::with_capacity(m * n);
    for block in x.chunks(X_ROWS_PER_BLOCK * k) {
        out.extend(gemv_block(block, w, block.len() / k, n, k));
    }
    out
}

fn gemv_block(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let (dot, dot4, rows4, groups) = (select_dot(), select_dot4(), select_rows4(), select_groups());
    out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let w_rows = |r: usize| &w[(first + r) * k..(first + r + 1) * k];
        let x_row = |i: usize| &x[i * k..(i + 1) * k];
        let rows = out.len() / m;
        // Whole groups of four weight rows: one x row streams past them (four independent
        // sums keep the FMA units busy); two or more go through the blocked kernel.
        let whole = rows / 4 * 4;
        if m == 1 {
            for r in (0..whole).step_by(4) {
                out[r..r + 4].copy_from_slice(&rows4([w_rows(r), w_rows(r + 1), w_rows(r + 2), w_rows(r + 3)], x));
            }
        } else {
            groups(&w[first * k..(first + whole) * k], x, m, k, &mut out[..whole * m]);
        }
        for r in whole..rows {
            let out_row = &mut out[r * m..(r + 1) * m];
            let mut i = 0;
            while i + 4 <= m {
                out_row[i..i + 4].copy_from_slice(&dot4(w_rows(r), [x_row(i), x_row(i + 1), x_row(i + 2), x_row(i + 3)]));
                i += 4;
            }
            for (i, o) in out_row.iter_mut().enumerate().skip(i) {
                *o = dot(w_rows(r), x_row(i));
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

type DotFn = fn(&[f32], &[f32]) -> f32;
type Dot4Fn = fn(&[f32], [&[f32]; 4]) -> [f32; 4];
type Rows4Fn = fn([&[f32]; 4], &[f32]) -> [f32; 4];
type GroupsFn = fn(&[f32], &[f32], usize, usize, &mut [f32]);

/// The products of whole groups of four contiguous weight rows (`w`, rows of `k`) with the
/// `m` rows of `x`, written `out[r * m + i]`.
fn select_groups() -> GroupsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |w, x, m, k, out| {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { x86::groups_avx512(w, x, m, k, out) }
            };
        }
    }
    groups_portable
}

/// [`select_groups`] without AVX-512: each group of four weight rows against tiles of four
/// x rows, then the x rows left one at a time.
fn groups_portable(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let (dot4, rows4) = (select_dot4(), select_rows4());
    let x_row = |i: usize| &x[i * k..(i + 1) * k];
    for (group, out) in w.chunks_exact(4 * k).zip(out.chunks_exact_mut(4 * m)) {
        let ws: [&[f32]; 4] = std::array::from_fn(|a| &group[a * k..(a + 1) * k]);
        let mut i = 0;
        while i + 4 <= m {
            let xs = [x_row(i), x_row(i + 1), x_row(i + 2), x_row(i + 3)];
            for (a, w_row) in ws.iter().enumerate() {
                out[a * m + i..a * m + i + 4].copy_from_slice(&dot4(w_row, xs));
            }
            i += 4;
        }
        for i in i..m {
            for (a, v) in rows4(ws, x_row(i)).into_iter().enumerate() {
                out[a * m + i] = v;
            }
        }
    }
}

fn select_rows4() -> Rows4Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |w, x| {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { x86::rows4_avx512(w, x) }
            };
        }
    }
    |w, x| w.map(|row| select_dot()(row, x))
}

fn select_dot4() -> Dot4Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |w, xs| {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { x86::dot4_avx512(w, xs) }
            };
        }
    }
    |w, xs| xs.map(|x| select_dot()(w, x))
}

fn select_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |a, b| {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { x86::dot_avx512(a, b) }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return |a, b| {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { x86::dot_avx2(a, b) }
            };
        }
    }
    dot_portable
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

/// The tail of a dot product past the last full sixteen, in order, fused.
#[inline]
fn tail(mut sum: f32, a: &[f32], b: &[f32]) -> f32 {
    for (x, y) in a.iter().zip(b) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

/// The canonical dot product in portable code (`mul_add` is a fused multiply-add).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 16 * 16;
    let mut acc = [0f32; 16];
    for (x, y) in a[..full].chunks_exact(16).zip(b[..full].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    tail(reduce16(acc), &a[full..n], &b[full..n])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Elements ahead of the current position to prefetch: the weight row streams from
    /// memory, and the hardware prefetcher alone leaves bandwidth unused.
    const PREFETCH_AHEAD: usize = 1024;

    /// Sixteen lanes of an AVX-512 register, reduced in the canonical order.
    #[target_feature(enable = "avx512f")]
    fn reduce(v: __m512) -> f32 {
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds exactly sixteen f32.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
        super::reduce16(lanes)
    }

    /// Prefetches, into L2, the weight row four rows below `row` at element `i`: the
    /// kernels that stream four rows of `k` elements at once run over contiguous rows, so
    /// this is the next group's row, fetched while the current group is summed. (The
    /// hardware prefetcher stops at every 4 KiB page, which is one row when `k` = 1024.)
    #[inline(always)]
    fn prefetch_next_group(row: *const f32, i: usize, k: usize) {
        // SAFETY: prefetching never faults; addresses past the matrix are harmless.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(i + 4 * k) as *const i8) };
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

    /// The canonical dot product, prefetching `a` (the weight row) ahead of use.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            // Prefetching never faults, so addresses past the end of `a` are harmless.
            if i % 64 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(pa.wrapping_add(i + PREFETCH_AHEAD) as *const i8);
            }
            // SAFETY: i + 16 <= n bounds both slices.
            let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
            acc = _mm512_fmadd_ps(x, y, acc);
            i += 16;
        }
        super::tail(reduce(acc), &a[i..n], &b[i..n])
    }

    /// Canonical dot products of one weight row with four `x` rows, loading each weight
    /// chunk once.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_avx512(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
        let n = xs.iter().fold(w.len(), |n, x| n.min(x.len()));
        let pw = w.as_ptr();
        let px = xs.map(|x| x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= n {
            if i % 64 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(i + PREFETCH_AHEAD) as *const i8);
            }
            // SAFETY: i + 16 <= n bounds every row.
            let wv = unsafe { _mm512_loadu_ps(pw.add(i)) };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                *acc = _mm512_fmadd_ps(wv, unsafe { _mm512_loadu_ps(px[j].add(i)) }, *acc);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for (j, o) in out.iter_mut().enumerate() {
            *o = super::tail(reduce(acc[j]), &w[i..n], &xs[j][i..n]);
        }
        out
    }

    /// Canonical dot products of four weight rows with one `x` row.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows4_avx512(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let n = w.iter().fold(x.len(), |n, r| n.min(r.len()));
        let pw = w.map(|r| r.as_ptr());
        let px = x.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY (every load): i + 16 <= n bounds all five rows.
            let xv = unsafe { _mm512_loadu_ps(px.add(i)) };
            for (a, p) in pw.iter().enumerate() {
                prefetch_next_group(*p, i, n);
                acc[a] = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(p.add(i)) }, xv, acc[a]);
            }
            i += 16;
        }
        let mut out = reduce4(acc);
        if i < n {
            for (a, o) in out.iter_mut().enumerate() {
                *o = super::tail(*o, &w[a][i..n], &x[i..n]);
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
    /// Each lane still sums its elements in order, so the bits are the canonical ones.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn groups_avx512(w: &[f32], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
        assert!(k > 0 && w.len().is_multiple_of(4 * k) && x.len() == m * k && out.len() == w.len() / k * m);
        let k16 = k / 16 * 16;
        let zero = [[_mm512_setzero_ps(); 4]; 4];
        let mut acc = vec![zero; m.div_ceil(4)];
        for (g, group) in w.chunks_exact(4 * k).enumerate() {
            acc.fill(zero);
            let mut from = 0;
            while from < k16 {
                let to = (from + K_CHUNK).min(k16);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let xs = &x[4 * t * k..(4 * t + 4).min(m) * k];
                    // SAFETY: `group` holds four rows and `xs` its rows of `k` elements, and
                    // `to` <= the last full sixteen of `k`.
                    unsafe {
                        match xs.len() / k {
                            4 => pass::<4>(group, xs, k, from..to, t == 0, acc),
                            3 => pass::<3>(group, xs, k, from..to, t == 0, acc),
                            2 => pass::<2>(group, xs, k, from..to, t == 0, acc),
                            _ => pass::<1>(group, xs, k, from..to, t == 0, acc),
                        }
                    }
                }
                from = to;
            }
            for (t, acc) in acc.iter().enumerate() {
                let sums = reduce4x4(*acc);
                for (a, (w_row, sums)) in group.chunks_exact(k).zip(sums).enumerate() {
                    for (i, sum) in (4 * t..m).zip(sums) {
                        let x_row = &x[i * k..(i + 1) * k];
                        out[(4 * g + a) * m + i] = super::tail(sum, &w_row[k16..], &x_row[k16..]);
                    }
                }
            }
        }
    }

    /// Adds elements `range` of four weight rows times `R` x rows to `acc[a][j]`,
    /// prefetching the next group's rows when `prefetch`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `group` holds 4 and `xs` `R` rows of `k` elements;
    /// `range` is in `0..k` in steps of sixteen.
    #[target_feature(enable = "avx512f")]
    unsafe fn pass<const R: usize>(group: &[f32], xs: &[f32], k: usize, range: std::ops::Range<usize>, prefetch: bool, acc: &mut [[__m512; 4]; 4]) {
        let pw: [*const f32; 4] = std::array::from_fn(|a| group[a * k..].as_ptr());
        let px: [*const f32; R] = std::array::from_fn(|j| xs[j * k..].as_ptr());
        let mut sums = *acc;
        let mut i = range.start;
        while i + 16 <= range.end {
            // SAFETY (every load): i + 16 <= k bounds every row.
            let wv = pw.map(|p| unsafe { _mm512_loadu_ps(p.add(i)) });
            if prefetch {
                for p in pw {
                    prefetch_next_group(p, i, k);
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

    /// The canonical dot product with AVX2/FMA: two eight-lane accumulators are lanes
    /// 0..8 and 8..16 of the sixteen.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY (for every load below): i + 16 <= n bounds both slices.
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
        super::tail(super::reduce16(lanes), &a[i..n], &b[i..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gets_the_same_bits_in_any_batch() {
        for (n, k) in [(37, 300), (12, 1553)] {
            same_bits_in_any_batch(n, k);
        }
    }

    fn same_bits_in_any_batch(n: usize, k: usize) {
        let x: Vec<f32> = (0..70 * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 89.0).collect();
        let alone: Vec<Vec<f32>> = (0..70).map(|i| gemv_f32(&x[i * k..(i + 1) * k], &w, 1, n, k)).collect();
        for m in [2, 3, 4, 5, 8, 17, 64, 65, 70] {
            let batch = gemv_f32(&x[..m * k], &w, m, n, k);
            for i in 0..m {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&batch[i * n..(i + 1) * n]), bits(&alone[i]), "row {i} in a batch of {m}");
            }
        }
    }

    #[test]
    fn the_portable_groups_give_the_same_bits() {
        for (m, k) in [(2, 100), (5, 1553), (9, 64)] {
            let n = 12;
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 89.0).collect();
            let (mut portable, mut selected) = (vec![0f32; n * m], vec![0f32; n * m]);
            groups_portable(&w, &x, m, k, &mut portable);
            select_groups()(&w, &x, m, k, &mut selected);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&portable), bits(&selected), "m{m} k{k}");
            let want: f64 = (0..k).map(|c| x[c] as f64 * w[c] as f64).sum();
            assert!((portable[0] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "m{m} k{k}: {} vs {want}", portable[0]);
        }
    }

    #[test]
    fn matches_a_plain_loop_for_odd_shapes() {
        // (3, 9, 1700) and (9, 12, 1553) span several k chunks of the blocked kernel, with a tail.
        for &(m, n, k) in &[(1, 1, 1), (1, 130, 37), (3, 67, 100), (8, 200, 64), (5, 1, 1030), (13, 70, 33), (32, 131, 1024), (3, 9, 1700), (9, 12, 1553)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let got = gemv_f32(&x, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
                    let g = got[i * n + j] as f64;
                    assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "m{m} n{n} k{k} [{i},{j}]: {g} vs {want}");
                }
            }
            for j in 0..n {
                let (row, x0) = (&w[j * k..(j + 1) * k], &x[..k]);
                let mut all = vec![dot_portable(row, x0)];
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: checked just above.
                        all.push(unsafe { x86::dot_avx2(row, x0) });
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: checked just above.
                        all.push(unsafe { x86::dot_avx512(row, x0) });
                    }
                }
                for v in all {
                    assert_eq!(v.to_bits(), got[j].to_bits(), "k{k}: every kernel sums in the same order");
                }
            }
        }
    }
}
