//! The AVX2 kernels (with FMA and F16C), generic over the weight element type, for CPUs
//! without AVX-512. The sixteen canonical lanes are two eight-lane registers: lanes 0..8
//! and 8..16, except for bf16, whose sixteen elements are loaded at once and split into
//! their even and odd elements (a shift and a mask instead of two widening loads), so the
//! registers hold lanes 0, 2, ..., 14 and 1, 3, ..., 15 and `x` is read in that order
//! ([`arrange`]). Each register lane still sums its canonical lane's elements in order and
//! [`reduce`] puts the lanes back before the canonical tree, so every kernel gives the bits
//! of the AVX-512 and portable ones.

use std::arch::x86_64::*;

use super::{Elem, Stored};

pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
}

/// Whether `S`'s sixteen-element chunks are held as (even, odd) elements.
const fn paired<S: Stored>() -> bool {
    matches!(S::KIND, Elem::Bf16)
}

/// The rows of `x` (`k` elements each) in the order the kernels for `S` read them: for
/// bf16, each whole chunk of sixteen as its eight even then its eight odd elements (the
/// tail as is); `None` where that is the order they are in.
pub fn arrange<S: Stored>(x: &[f32], k: usize) -> Option<Vec<f32>> {
    if !paired::<S>() || k < 16 {
        return None;
    }
    let mut out = x.to_vec();
    for (row, src) in out.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
        for (dst, src) in row.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
            for j in 0..8 {
                dst[j] = src[2 * j];
                dst[8 + j] = src[2 * j + 1];
            }
        }
    }
    Some(out)
}

/// Eight elements of type `S` at `p`, widened to f32 exactly (E4M3 as its value times 2⁻⁸:
/// see [`e4m3_as_f16`]).
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
            Elem::E4m3 => _mm256_cvtph_ps(_mm256_castsi256_si128(e4m3_as_f16(_mm256_cvtepi8_epi16(_mm_loadl_epi64(p.cast()))))),
        }
    }
}

/// FP8 E4M3 bytes, sign-extended to 16 bits, as the f16 of their value times 2⁻⁸: E4M3's
/// exponent (bias 7) and mantissa read as f16's (bias 15, three mantissa bits shifted to
/// the top of ten) scale every value by 2⁻⁸, subnormals included, so a shift by seven and a
/// mask (keeping the sign that the extension put in bit 15, clearing the one shifted into
/// bit 14) are the whole conversion. [`reduce`] multiplies by 2⁸ once per dot product:
/// scaling by a power of two commutes with every rounding of the sum (barring f32
/// underflow), so the bits are those of the exact values'.
#[inline]
#[target_feature(enable = "avx2")]
fn e4m3_as_f16(sign_extended: __m256i) -> __m256i {
    _mm256_and_si256(_mm256_slli_epi16::<7>(sign_extended), _mm256_set1_epi16(0xBF80_u16 as i16))
}

/// The sixteen elements at element `i` of row `p`, widened, as the two registers that hold
/// their canonical lanes (see the module docs).
///
/// # Safety
/// As [`load8`], for sixteen elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16<S: Stored>(p: *const u8, i: usize) -> (__m256, __m256) {
    let b = S::KIND.bytes();
    // SAFETY: the caller guarantees sixteen elements.
    unsafe {
        if paired::<S>() {
            let v = _mm256_loadu_si256(p.add(i * b).cast());
            let even = _mm256_slli_epi32::<16>(v);
            let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
            (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
        } else if S::KIND == Elem::E4m3 {
            // Sixteen bytes at once: one extension, shift and mask for both registers.
            let h = e4m3_as_f16(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(i).cast())));
            (_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
        } else {
            (load8::<S>(p.add(i * b)), load8::<S>(p.add((i + 8) * b)))
        }
    }
}

/// The canonical sum of the sixteen lanes held by the two registers of [`load16`]'s order,
/// in registers: each add of the canonical tree (lane `l` += lane `l + 8`, `+ 4`, `+ 2`,
/// `+ 1`) adds the same two values as [`super::reduce16`] does.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce<S: Stored>(r0: __m256, r1: __m256) -> f32 {
    let fold = |v: __m256| _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pairs = |v: __m128| _mm_add_ps(v, _mm_movehl_ps(v, v));
    let last = if paired::<S>() {
        // r0 lane j is canonical lane 2j, r1 lane j is 2j + 1: after `+ 8` fold(r0) holds
        // lanes 0, 2, 4, 6 and fold(r1) 1, 3, 5, 7; after `+ 4` lanes 0, 2 and 1, 3.
        let (even, odd) = (pairs(fold(r0)), pairs(fold(r1)));
        // `+ 2`: lane 0 (even's 0 + 1) and lane 1 (odd's 0 + 1); then `+ 1`.
        let (c0, c1) = (_mm_add_ss(even, _mm_movehdup_ps(even)), _mm_add_ss(odd, _mm_movehdup_ps(odd)));
        _mm_add_ss(c0, c1)
    } else {
        // Lanes 0..8 and 8..16: `+ 8` is r0 + r1, `+ 4` its halves, `+ 2` and `+ 1` pairs.
        let two = pairs(fold(_mm256_add_ps(r0, r1)));
        _mm_add_ss(two, _mm_movehdup_ps(two))
    };
    // E4M3 lanes hold their values times 2⁻⁸ (see `e4m3_as_f16`).
    let scale = if S::KIND == Elem::E4m3 { 256.0 } else { 1.0 };
    _mm_cvtss_f32(last) * scale
}

/// Whether to prefetch at element `i`: once per 64-byte line of the weight row.
#[inline(always)]
fn line_start<S: Stored>(i: usize) -> bool {
    (i * S::KIND.bytes()).is_multiple_of(64)
}

/// The canonical lane sums of `R` weight rows (`w`) with `M` rows of arranged `x` over
/// their first `k16` elements (a multiple of 16), streaming the weights once: each chunk of
/// sixteen is widened once and used for every x row. The lines `ahead` bytes past each
/// weight row's current one are prefetched into L2 (the next rows of a run; the hardware
/// prefetcher stops at every 4 KiB page).
///
/// # Safety
/// AVX2, FMA and F16C; every weight row holds `k16` elements and every x row `k16` f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream<S: Stored, const R: usize, const M: usize>(w: [*const u8; R], x: [*const f32; M], k16: usize, ahead: usize) -> [[[__m256; 2]; M]; R] {
    let b = S::KIND.bytes();
    let mut acc = [[[_mm256_setzero_ps(); 2]; M]; R];
    // One chunk of sixteen into every accumulator of each weight row.
    let chunk = |i: usize, acc: &mut [[[__m256; 2]; M]; R]| {
        for (p, acc) in w.iter().zip(acc.iter_mut()) {
            // SAFETY (every load): i + 16 <= k16 bounds every row.
            let (w0, w1) = unsafe { load16::<S>(*p, i) };
            for (px, acc) in x.iter().zip(acc.iter_mut()) {
                acc[0] = _mm256_fmadd_ps(w0, unsafe { _mm256_loadu_ps(px.add(i)) }, acc[0]);
                acc[1] = _mm256_fmadd_ps(w1, unsafe { _mm256_loadu_ps(px.add(i + 8)) }, acc[1]);
            }
        }
    };
    // A 64-byte line of each weight row per turn (unrolled: a prefetch per line, no branch),
    // then the chunks that do not fill a line.
    let per_line = (64 / (16 * b)).max(1);
    let lines = k16 / (16 * per_line) * (16 * per_line);
    let mut i = 0;
    while i < lines {
        for p in &w {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(i * b + ahead).cast());
        }
        for u in 0..per_line {
            chunk(i + 16 * u, &mut acc);
        }
        i += 16 * per_line;
    }
    while i < k16 {
        chunk(i, &mut acc);
        i += 16;
    }
    acc
}

/// The canonical dot product of weight row `w` with the arranged row `x`.
///
/// # Safety
/// AVX2, FMA and F16C; `w` holds `x.len()` elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot<S: Stored>(w: &[u8], x: &[f32]) -> f32 {
    let (n, k16) = (x.len(), x.len() / 16 * 16);
    assert!(w.len() >= n * S::KIND.bytes());
    // SAFETY: both rows hold k16 elements.
    let [[acc]] = unsafe { stream::<S, 1, 1>([w.as_ptr()], [x.as_ptr()], k16, 0) };
    super::tail::<S>(reduce::<S>(acc[0], acc[1]), w, x, k16)
}

/// Canonical dot products of one weight row with four arranged `x` rows.
///
/// # Safety
/// AVX2, FMA and F16C; the `x` rows have equal lengths and `w` holds as many elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4<S: Stored>(w: &[u8], xs: [&[f32]; 4]) -> [f32; 4] {
    let (n, k16) = (xs[0].len(), xs[0].len() / 16 * 16);
    assert!(w.len() >= n * S::KIND.bytes() && xs.iter().all(|x| x.len() == n));
    // SAFETY: every row holds k16 elements.
    let [acc] = unsafe { stream::<S, 1, 4>([w.as_ptr()], xs.map(|x| x.as_ptr()), k16, 0) };
    std::array::from_fn(|j| super::tail::<S>(reduce::<S>(acc[j][0], acc[j][1]), w, xs[j], k16))
}

/// Canonical dot products of four contiguous weight rows with one arranged `x` row,
/// prefetching the next four rows as these stream.
///
/// # Safety
/// AVX2, FMA and F16C; each `w` row holds `x.len()` elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows4<S: Stored>(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    let (n, k16) = (x.len(), x.len() / 16 * 16);
    assert!(w.iter().all(|r| r.len() >= n * S::KIND.bytes()));
    // SAFETY: every row holds k16 elements.
    let acc = unsafe { stream::<S, 4, 1>(w.map(|r| r.as_ptr()), [x.as_ptr()], k16, 4 * n * S::KIND.bytes()) };
    std::array::from_fn(|a| super::tail::<S>(reduce::<S>(acc[a][0][0], acc[a][0][1]), w[a], x, k16))
}

/// The most rows of `x` that [`few`] serves better than [`groups`]: [`groups`] widens each
/// weight chunk once for all of them, which pays sooner for 8-bit weights (measured: eight
/// x rows of a 3584 × 1024 bf16 or f32 matrix ran 5–20 % faster here, int8 sixteen rows
/// 20 % slower).
pub const fn few_most<S: Stored>() -> usize {
    if S::KIND.bytes() >= 2 { 8 } else { 4 }
}

/// Weight rows per block of [`few`]: a block is read from memory once, by the first tile
/// of x rows, and stays in L2 while the other tiles pass it.
const BLOCK_ROWS: usize = 12;

/// `out[r * m + i]` = the canonical dot product of weight row `r` with arranged x row `i`,
/// for `w` holding any number of contiguous rows of `k` elements and `x` holding `m` rows:
/// the weights stream from memory once, a block of rows at a time, and each tile of up to
/// four x rows passes the block a few weight rows at a time, as many as keep twelve or
/// fewer accumulators in registers.
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn few<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let row_bytes = k * S::KIND.bytes();
    assert!(k > 0 && w.len().is_multiple_of(row_bytes) && x.len() == m * k && out.len() == w.len() / row_bytes * m);
    let rows = w.len() / row_bytes;
    for first in (0..rows).step_by(BLOCK_ROWS) {
        let block = &w[first * row_bytes..(first + BLOCK_ROWS).min(rows) * row_bytes];
        let mut i = 0;
        while i < m {
            let height = (m - i).min(4);
            let at = Tile { first, i, m, k };
            // SAFETY: the caller's guarantees, passed on.
            unsafe {
                match height {
                    1 => few_tile::<S, 4, 1>(block, x, at, out),
                    2 => few_tile::<S, 2, 2>(block, x, at, out),
                    3 => few_tile::<S, 1, 3>(block, x, at, out),
                    _ => few_tile::<S, 1, 4>(block, x, at, out),
                }
            }
            i += height;
        }
    }
}

/// Where a tile of [`few`] is: its block's first weight row, its first x row, and the
/// shape of the whole product.
#[derive(Clone, Copy)]
struct Tile {
    first: usize,
    i: usize,
    m: usize,
    k: usize,
}

/// The products of every weight row of `block` with x rows `at.i .. at.i + M`, `R` weight
/// rows at a time, written `out[(at.first + r) * at.m + at.i + j]`.
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn few_tile<S: Stored, const R: usize, const M: usize>(block: &[u8], x: &[f32], at: Tile, out: &mut [f32]) {
    let Tile { first, i, m, k } = at;
    let row_bytes = k * S::KIND.bytes();
    let rows = block.len() / row_bytes;
    let k16 = k / 16 * 16;
    let xs: [&[f32]; M] = std::array::from_fn(|j| &x[(i + j) * k..(i + j + 1) * k]);
    let mut write = |r: usize, lanes: &[[__m256; 2]; M]| {
        let w_row = &block[r * row_bytes..(r + 1) * row_bytes];
        for (j, lanes) in lanes.iter().enumerate() {
            out[(first + r) * m + i + j] = super::tail::<S>(reduce::<S>(lanes[0], lanes[1]), w_row, xs[j], k16);
        }
    };
    let mut r = 0;
    while r + R <= rows {
        // SAFETY: rows r..r + R and every x row hold k16 elements.
        let acc = unsafe { stream::<S, R, M>(std::array::from_fn(|a| block.as_ptr().add((r + a) * row_bytes)), xs.map(|x| x.as_ptr()), k16, R * row_bytes) };
        for (a, lanes) in acc.iter().enumerate() {
            write(r + a, lanes);
        }
        r += R;
    }
    while r < rows {
        // SAFETY: row r and every x row hold k16 elements.
        let [lanes] = unsafe { stream::<S, 1, M>([block.as_ptr().add(r * row_bytes)], xs.map(|x| x.as_ptr()), k16, row_bytes) };
        write(r, &lanes);
        r += 1;
    }
}

/// Elements of `k` per pass of [`groups`]: a group's four rows of this many f32 take
/// 16 KiB and a tile's three x rows 12 KiB, within L1; each half-pass reads half of both.
const K_CHUNK: usize = 1024;

/// x rows per register tile of [`groups`]: four weight rows × three x rows are twelve
/// accumulators, with three registers for the x rows and one for the weight row in turn.
const X_TILE: usize = 3;

/// `out[(r + a) * m + i]` = the canonical dot product of weight row `r + a` with arranged
/// x row `i`, for `w` holding whole groups of four contiguous rows of `k` elements and `x`
/// holding `m` rows. The two registers of every sixteen-element chunk sum independently
/// until [`reduce`], so the x rows are split once into their two halves (the first and the
/// second register's elements of every chunk, each contiguous), and each group is swept
/// over `k` in chunks: the chunk's four rows are widened into the same two halves in L1,
/// then every tile of three x rows passes each half with one accumulator per (weight row,
/// x row) pair. Each lane sums its elements in order, so the bits are the canonical ones.
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn groups<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let b = S::KIND.bytes();
    let row_bytes = k * b;
    assert!(k > 0 && w.len().is_multiple_of(4 * row_bytes) && x.len() == m * k && out.len() == w.len() / row_bytes * m);
    let (k16, half) = (k / 16 * 16, k / 16 * 8);
    // halves[h][i * half ..]: the h-th register's elements of x row i, chunk after chunk.
    let mut halves = [vec![0f32; m * half], vec![0f32; m * half]];
    for i in 0..m {
        for c in 0..k16 / 16 {
            for h in 0..2 {
                halves[h][i * half + 8 * c..][..8].copy_from_slice(&x[i * k + 16 * c + 8 * h..][..8]);
            }
        }
    }
    // acc[t][h][a][j]: the lanes of register h of weight row a with x row X_TILE·t + j.
    let zero = [[[_mm256_setzero_ps(); X_TILE]; 4]; 2];
    let mut acc = vec![zero; m.div_ceil(X_TILE)];
    // wide[h][a * K_CHUNK / 2 ..]: the h-th register's elements of the chunk of row a.
    let mut wide = [vec![0f32; 2 * K_CHUNK], vec![0f32; 2 * K_CHUNK]];
    for (g, group) in w.chunks_exact(4 * row_bytes).enumerate() {
        acc.fill(zero);
        let rows: [*const u8; 4] = std::array::from_fn(|a| group[a * row_bytes..].as_ptr());
        let mut from = 0;
        while from < k16 {
            let to = (from + K_CHUNK).min(k16);
            for (a, &p) in rows.iter().enumerate() {
                let mut i = from;
                while i < to {
                    if line_start::<S>(i) {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add((i + 4 * k) * b).cast());
                    }
                    // SAFETY: i + 16 <= k16 bounds the row; each half holds K_CHUNK / 2 per row.
                    unsafe {
                        let (r0, r1) = load16::<S>(p, i);
                        let at = a * K_CHUNK / 2 + (i - from) / 2;
                        _mm256_storeu_ps(wide[0].as_mut_ptr().add(at), r0);
                        _mm256_storeu_ps(wide[1].as_mut_ptr().add(at), r1);
                    }
                    i += 16;
                }
            }
            let len = (to - from) / 2;
            for (t, acc) in acc.iter_mut().enumerate() {
                let first = X_TILE * t;
                for (h, acc) in acc.iter_mut().enumerate() {
                    let pw: [*const f32; 4] = std::array::from_fn(|a| wide[h][a * K_CHUNK / 2..].as_ptr());
                    let px = |j: usize| halves[h][(first + j) * half + from / 2..].as_ptr();
                    // SAFETY: every pointer has `len` f32 (the tile's rows are below m).
                    unsafe {
                        match m - first {
                            1 => pass::<1>(pw, [px(0)], len, acc),
                            2 => pass::<2>(pw, [px(0), px(1)], len, acc),
                            _ => pass::<X_TILE>(pw, [px(0), px(1), px(2)], len, acc),
                        }
                    }
                }
            }
            from = to;
        }
        for (t, acc) in acc.iter().enumerate() {
            for (a, (r0, r1)) in acc[0].iter().zip(&acc[1]).enumerate() {
                let w_row = &group[a * row_bytes..(a + 1) * row_bytes];
                for (j, (&r0, &r1)) in r0.iter().zip(r1).enumerate() {
                    let i = X_TILE * t + j;
                    if i < m {
                        out[(4 * g + a) * m + i] = super::tail::<S>(reduce::<S>(r0, r1), w_row, &x[i * k..(i + 1) * k], k16);
                    }
                }
            }
        }
    }
}

/// Adds `len` elements (a multiple of 8) of four f32 weight rows `w` times `C` x rows to
/// the accumulators (`acc[a][j]`: weight row `a` with x row `j`).
///
/// # Safety
/// AVX2 and FMA; every pointer has `len` readable f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass<const C: usize>(w: [*const f32; 4], xs: [*const f32; C], len: usize, acc: &mut [[__m256; X_TILE]; 4]) {
    let mut s: [[__m256; C]; 4] = std::array::from_fn(|a| std::array::from_fn(|j| acc[a][j]));
    let mut i = 0;
    while i < len {
        // SAFETY (every load): i + 8 <= len bounds every row.
        let y: [__m256; C] = std::array::from_fn(|j| unsafe { _mm256_loadu_ps(xs[j].add(i)) });
        for (p, s) in w.iter().zip(s.iter_mut()) {
            let v = unsafe { _mm256_loadu_ps(p.add(i)) };
            for (s, y) in s.iter_mut().zip(y) {
                *s = _mm256_fmadd_ps(v, y, *s);
            }
        }
        i += 8;
    }
    for (acc, s) in acc.iter_mut().zip(s) {
        acc[..C].copy_from_slice(&s);
    }
}
