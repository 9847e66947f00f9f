//! The decode kernel: `x · Wᵀ` for a few rows of `x` against an f32 weight matrix stored
//! `[n, k]`. Decoding reads every weight once per step, so this is memory-bound: each
//! weight row is streamed from memory once, kept in L1 while every `x` row is dotted with
//! it, and the rows of `W` are split across threads in contiguous runs.
//! General matrix products (prefill, large batches) stay on candle.

use rayon::prelude::*;

/// Rows of `W` per parallel task: large enough to amortise scheduling, small enough to
/// balance two or more threads on the smallest projections.
const ROWS_PER_TASK: usize = 64;

/// `out[i, j] = dot(x[i, :], w[j, :])` for `x: [m, k]`, `w: [n, k]`; returns `[m, n]`.
pub fn gemv_f32(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    let mut out_t = vec![0f32; n * m];
    let (dot, dot4, tile) = (select_dot(), select_dot4(), select_tile4x4());
    out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let w_rows = |r: usize| &w[(first + r) * k..(first + r + 1) * k];
        let x_row = |i: usize| &x[i * k..(i + 1) * k];
        let rows = out.len() / m;
        let mut r = 0;
        // Four weight rows at a time (they stay in L1 while every x row passes by), tiled
        // with four x rows: eight loads feed sixteen FMAs.
        if m >= 4 {
            while r + 4 <= rows {
                let ws = [w_rows(r), w_rows(r + 1), w_rows(r + 2), w_rows(r + 3)];
                let mut i = 0;
                while i + 4 <= m {
                    let t = tile(ws, [x_row(i), x_row(i + 1), x_row(i + 2), x_row(i + 3)]);
                    for (a, row) in t.iter().enumerate() {
                        out[(r + a) * m + i..(r + a) * m + i + 4].copy_from_slice(row);
                    }
                    i += 4;
                }
                for i in i..m {
                    for (a, wr) in ws.iter().enumerate() {
                        out[(r + a) * m + i] = dot(wr, x_row(i));
                    }
                }
                r += 4;
            }
        }
        for r in r..rows {
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
type Tile4x4Fn = fn([&[f32]; 4], [&[f32]; 4]) -> [[f32; 4]; 4];

fn select_tile4x4() -> Tile4x4Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |w, xs| {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { x86::tile4x4_avx512(w, xs) }
            };
        }
    }
    |w, xs| w.map(|row| select_dot4()(row, xs))
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

/// Dot product with 16 independent lanes, so the compiler can vectorise without
/// reassociating a single running sum.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Elements ahead of the current position to prefetch: the weight row streams from
    /// memory, and the hardware prefetcher alone leaves bandwidth unused.
    const PREFETCH_AHEAD: usize = 1024;

    /// AVX-512 dot product, four accumulators of sixteen lanes, prefetching `a` (the weight
    /// row) ahead of use.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            // Prefetching never faults, so addresses past the end of `a` are harmless.
            let ahead = pa.wrapping_add(i + PREFETCH_AHEAD) as *const i8;
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
            }
            for (l, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i + 64 <= n bounds both slices.
                let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i + 16 * l)), _mm512_loadu_ps(pb.add(i + 16 * l))) };
                *acc = _mm512_fmadd_ps(x, y, *acc);
            }
            i += 64;
        }
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bounds both slices.
            let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
            acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }

    /// Dot products of one weight row with four `x` rows, loading each weight chunk once.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_avx512(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
        let n = xs.iter().fold(w.len(), |n, x| n.min(x.len()));
        let pw = w.as_ptr();
        let px = xs.map(|x| x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 32 <= n {
            let ahead = pw.wrapping_add(i + PREFETCH_AHEAD) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            for (u, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i + 32 <= n bounds every row.
                let wv = unsafe { _mm512_loadu_ps(pw.add(i + 16 * u)) };
                for (j, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    *acc = _mm512_fmadd_ps(wv, unsafe { _mm512_loadu_ps(px[j].add(i + 16 * u)) }, *acc);
                }
            }
            i += 32;
        }
        let mut out = [0f32; 4];
        for (j, o) in out.iter_mut().enumerate() {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]));
            for c in i..n {
                *o += w[c] * xs[j][c];
            }
        }
        out
    }

    /// The 4 × 4 dot products of four weight rows with four `x` rows, sixteen accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile4x4_avx512(w: [&[f32]; 4], xs: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = w.iter().chain(&xs).fold(usize::MAX, |n, r| n.min(r.len()));
        let pw = w.map(|r| r.as_ptr());
        let px = xs.map(|r| r.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY (every load): i + 16 <= n bounds all eight rows.
            let wv = pw.map(|p| unsafe { _mm512_loadu_ps(p.add(i)) });
            for p in pw {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + PREFETCH_AHEAD) as *const i8);
            }
            for (j, p) in px.iter().enumerate() {
                let xv = unsafe { _mm512_loadu_ps(p.add(i)) };
                for a in 0..4 {
                    acc[a][j] = _mm512_fmadd_ps(wv[a], xv, acc[a][j]);
                }
            }
            i += 16;
        }
        let mut out = [[0f32; 4]; 4];
        for a in 0..4 {
            for j in 0..4 {
                out[a][j] = _mm512_reduce_add_ps(acc[a][j]);
                for c in i..n {
                    out[a][j] += w[a][c] * xs[j][c];
                }
            }
        }
        out
    }

    /// AVX2/FMA dot product, four accumulators of eight lanes to hide FMA latency.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (for every load below): i + 32 <= n, or i + 8 <= n, bounds both slices.
        while i + 32 <= n {
            for (l, acc) in acc.iter_mut().enumerate() {
                let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i + 8 * l)), _mm256_loadu_ps(pb.add(i + 8 * l))) };
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds exactly eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        let mut sum: f32 = lanes.iter().sum();
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_loop_for_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (1, 130, 37), (3, 67, 100), (8, 200, 64), (5, 1, 1030), (13, 70, 33), (32, 131, 1024)] {
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
                    assert!((v - got[j]).abs() <= 1e-3 * (1.0 + got[j].abs()), "k{k}: {v} vs {}", got[j]);
                }
            }
        }
    }
}
