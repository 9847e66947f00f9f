//! How weights are kept: the dtype of dense matrices (`--dtype`: as stored by default) and
//! 8-bit weights (`--quantization`): int8 quantized at load, or FP8 E4M3 as FP8 checkpoints
//! store it or quantized at load. Both are weight-only, symmetric, one f32 scale per output
//! row: `w[r, c] = q[r, c] · scale[r]`. Activations, norms and the KV cache stay f32.
//!
//! Per output row (channel), not per group: a product's row scale multiplies its finished
//! dot product once, so the kernels stay the f32 kernels with a widening load, and the
//! measured error on the fixtures (worker/tests/quantized.rs) is at the level of the
//! bf16 → int8 rounding itself; FP8 checkpoints publish the same layout (`strategy:
//! channel`) or one scale per tensor, which is a row scale repeated.

use rayon::prelude::*;

use crate::backend::{DType, Elem};
use crate::error::{EngineError, Result};
use crate::weights::{Buffer, HostMatrix, HostTensor};

pub use cluster::precision::{Format, Quantization, WeightDType, rank_weight_bytes};

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// `v` rounded to the nearest E4M3 value (ties to even), saturating at ±448.
pub fn e4m3_from_f32(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a.is_nan() {
        return 0x7F;
    }
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127;
    if exp < -6 {
        // Subnormal: a multiple of 2⁻⁹ (8 of them reach 2⁻⁶, whose byte is 0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Keep three mantissa bits, rounding the other twenty to nearest, ties to even; a carry
    // moves into the exponent as it should.
    let (keep, rest) = ((bits >> 20) & 7, bits & 0xF_FFFF);
    let up = u32::from(rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1));
    let byte = ((((exp + 7) as u32) << 3) | keep) + up;
    sign | byte.min(0x7E) as u8
}

/// `m` as the format asked, rows in parallel: a dense matrix converted to `dtype`, or
/// quantized with one scale per row (`Elem::I8`: max |w| / 127; `Elem::E4m3`: / 448).
/// An FP8 matrix converts to a dense dtype by dequantizing; to int8 it does not.
pub fn convert(m: HostMatrix<'static>, format: Format) -> Result<HostMatrix<'static>> {
    let (rows, cols) = m.dims();
    match (m, format) {
        (HostMatrix::Dense(t), Format::Dense(d)) if t.dtype == d => Ok(HostMatrix::Dense(t)),
        (m @ HostMatrix::Scaled { elem: Elem::E4m3, .. }, Format::Fp8) => Ok(m),
        (HostMatrix::Scaled { elem, .. }, Format::Int8) => {
            Err(EngineError::Backend(format!("{elem:?} weights cannot be requantized to int8 (use --quantization auto or none)")))
        }
        (m, Format::Dense(d)) => {
            let mut buffer = Buffer::zeroed(rows * cols * d.size_in_bytes())?;
            let out = &mut buffer.bytes_mut()[..rows * cols * d.size_in_bytes()];
            out.par_chunks_mut((cols * d.size_in_bytes()).max(1)).enumerate().for_each(|(r, dst)| {
                let row = widened_row(&m, r);
                for (b, v) in dst.chunks_exact_mut(d.size_in_bytes()).zip(row) {
                    match d {
                        DType::F32 => b.copy_from_slice(&v.to_le_bytes()),
                        DType::BF16 => b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                        DType::F16 => b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    }
                }
            });
            Ok(HostMatrix::Dense(HostTensor { dtype: d, shape: vec![rows, cols], data: buffer.freeze() }))
        }
        (m, Format::Int8 | Format::Fp8) => {
            let (elem, max) = if format == Format::Int8 { (Elem::I8, 127.0) } else { (Elem::E4m3, E4M3_MAX) };
            let mut buffer = Buffer::zeroed(rows * cols)?;
            let values = &mut buffer.bytes_mut()[..rows * cols];
            let mut scales = vec![0f32; rows];
            values.par_chunks_mut(cols.max(1)).zip(scales.par_iter_mut()).enumerate().for_each(|(r, (dst, scale))| {
                let row = widened_row(&m, r);
                let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                *scale = if amax > 0.0 { amax / max } else { 1.0 };
                if elem == Elem::I8 {
                    for (q, v) in dst.iter_mut().zip(row) {
                        *q = round_to_i8(v / *scale) as u8;
                    }
                } else {
                    for (q, v) in dst.iter_mut().zip(row) {
                        *q = e4m3_from_f32(v / *scale);
                    }
                }
            });
            Ok(HostMatrix::Scaled { elem, rows, cols, values: buffer.freeze(), scales })
        }
    }
}

/// `x` (|x| ≤ 127.5) rounded to the nearest integer, ties to even: adding and removing 1.5·2²³
/// leaves no fraction bits (plain float arithmetic, where `round` would call libm).
fn round_to_i8(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    ((x + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8
}

/// Row `r` of `m` as f32 (scaled rows multiplied out).
fn widened_row(m: &HostMatrix<'_>, r: usize) -> Vec<f32> {
    match m {
        HostMatrix::Dense(t) => {
            let (cols, size) = (t.shape.get(1).copied().unwrap_or(1), t.dtype.size_in_bytes());
            let row = t.data[r * cols * size..(r + 1) * cols * size].chunks_exact(size);
            // One loop per dtype, so each is a plain widening loop.
            match t.dtype {
                DType::F32 => row.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                DType::BF16 => row.map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
                DType::F16 => row.map(|b| Elem::F16.get(b, 0)).collect(),
            }
        }
        HostMatrix::Scaled { elem, cols, values, scales, .. } => {
            let row = &values[r * cols..(r + 1) * cols];
            (0..*cols).map(|c| elem.get(row, c) * scales[r]).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::E4M3_VALUES;
    use crate::weights::HostBytes;

    #[test]
    fn e4m3_encoding_rounds_to_nearest_even_and_saturates() {
        for b in 0..=255u8 {
            let v = E4M3_VALUES[b as usize];
            if v.is_nan() {
                continue;
            }
            let back = e4m3_from_f32(v);
            assert_eq!(E4M3_VALUES[back as usize].to_bits(), v.to_bits(), "byte {b:#04x} ({v}) round-trips");
        }
        // Between every two neighbouring positive values: the midpoint goes to the even
        // mantissa, a little off it to the nearer one.
        for b in 0..0x7Du8 {
            let (lo, hi) = (E4M3_VALUES[b as usize], E4M3_VALUES[b as usize + 1]);
            let mid = (lo + hi) / 2.0;
            assert_eq!(e4m3_from_f32(mid), if b % 2 == 0 { b } else { b + 1 }, "midpoint of {lo} and {hi}");
            assert_eq!(e4m3_from_f32(mid - (hi - lo) / 8.0), b);
            assert_eq!(e4m3_from_f32(mid + (hi - lo) / 8.0), b + 1);
        }
        assert_eq!(e4m3_from_f32(1e9), 0x7E);
        assert_eq!(e4m3_from_f32(-500.0), 0xFE);
        assert_eq!(e4m3_from_f32(1e-4), 0);
    }

    #[test]
    fn quantized_rows_stay_within_half_a_step() {
        let (rows, cols) = (5, 300);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 997.0 * (1 + i / cols) as f32).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dense = || HostMatrix::Dense(HostTensor { dtype: DType::F32, shape: vec![rows, cols], data: HostBytes::Owned(bytes.clone()) });
        for format in [Format::Int8, Format::Fp8] {
            let q = convert(dense(), format).unwrap();
            let HostMatrix::Scaled { scales, .. } = &q else { panic!("{format:?} is scaled") };
            for r in 0..rows {
                let amax = w[r * cols..(r + 1) * cols].iter().fold(0f32, |a, v| a.max(v.abs()));
                let got = widened_row(&q, r);
                for (g, v) in got.iter().zip(&w[r * cols..]) {
                    // int8: half a step of amax/127; E4M3: 3 mantissa bits, half an ulp ≤ 1/16 of |v| (or of the subnormal step).
                    let bound = if format == Format::Int8 { scales[r] / 2.0 } else { (v.abs() / 16.0).max(scales[r] * 2f32.powi(-10)) };
                    assert!((g - v).abs() <= bound * 1.0001, "{format:?} row {r}: {g} vs {v} (amax {amax})");
                }
            }
        }
        // And back to dense: the dequantized values.
        let q = convert(dense(), Format::Int8).unwrap();
        let back = convert(q.clone(), Format::Dense(DType::F32)).unwrap();
        assert_eq!(widened_row(&back, 3), widened_row(&q, 3));
    }

    /// What the engine loads, byte for byte, for every fixture under each option and for
    /// ranks of sharded layouts (a rank loads alone: its communicators are not used to load).
    #[test]
    fn rank_weight_bytes_is_what_the_engine_loads() {
        use std::sync::Arc;

        use crate::comm::SoloComm;
        use crate::engine::{CacheConfig, Engine, EngineOptions, LoadFormat, open_model};
        use crate::layout::Layout;
        use crate::rank::Parallel;

        let layout = |tp, ep, pp| Layout { tp, ep, pp, stage_layers: Vec::new() };
        let fixtures: [(&str, Vec<Layout>); 6] = [
            ("mistral-v1-tiny", vec![layout(2, 1, 1), layout(1, 1, 2), layout(2, 1, 2)]),
            ("mixtral-v3-tiny", vec![layout(1, 2, 1), layout(2, 2, 1), layout(1, 3, 2)]),
            ("mistral-nemo-tiny", vec![layout(2, 1, 1), layout(1, 1, 3)]),
            ("mixtral-f32-tiny", vec![layout(2, 4, 1), layout(8, 1, 1)]),
            ("mistral-fp8-tiny", vec![layout(2, 1, 1), layout(4, 1, 2)]),
            ("mixtral-fp8-tiny", vec![layout(2, 2, 1), layout(1, 1, 2)]),
        ];
        let options: [(WeightDType, Quantization); 5] = [
            (WeightDType::Auto, Quantization::Auto),
            (WeightDType::As(DType::F32), Quantization::Auto),
            (WeightDType::Auto, Quantization::Int8),
            (WeightDType::Auto, Quantization::Fp8),
            (WeightDType::As(DType::BF16), Quantization::None),
        ];
        let mut checked = 0;
        for (name, sharded) in fixtures {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
            let (config, source) = open_model(&dir, LoadFormat::Safetensors).unwrap();
            for layout in std::iter::once(Layout::default()).chain(sharded) {
                layout.validate(&config).unwrap_or_else(|e| panic!("{name} {layout:?}: {e}"));
                for (dtype, quantization) in options {
                    let opts =
                        EngineOptions { dtype, quantization, load_format: LoadFormat::Safetensors, cache: CacheConfig { num_blocks: 1, block_size: 16 } };
                    for rank in 0..layout.world() {
                        let solo = || Arc::new(SoloComm) as Arc<dyn crate::comm::Comm>;
                        let par = Parallel { layout: layout.clone(), rank, coords: layout.coords(rank), world: solo(), tp: solo(), ep: solo() };
                        let what = format!("{name} {layout:?} rank {rank} --dtype {dtype} --quantization {quantization}");
                        match Engine::from_source(crate::Cpu, &config, &source, &opts, par) {
                            Ok(engine) => {
                                assert_eq!(rank_weight_bytes(&config, &layout, rank, dtype, quantization), engine.weight_bytes() as u64, "{what}");
                                checked += 1;
                            }
                            // FP8 weights are not requantized to int8: the worker refuses it.
                            Err(e) => assert!(config.fp8_weights && quantization == Quantization::Int8, "{what}: {e}"),
                        }
                    }
                }
            }
        }
        assert!(checked > 100, "{checked} loads compared");
        // Dummy weights are dense: an FP8 config sized with `fp8_weights` off.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-fp8-tiny");
        let (config, source) = open_model(&dir, LoadFormat::Dummy).unwrap();
        let engine = Engine::from_source(
            crate::Cpu,
            &config,
            &source,
            &EngineOptions { load_format: LoadFormat::Dummy, ..EngineOptions::default() },
            Parallel::single(),
        )
        .unwrap();
        let dense = crate::ModelConfig { fp8_weights: false, ..config };
        assert_eq!(rank_weight_bytes(&dense, &Layout::default(), 0, WeightDType::Auto, Quantization::Auto), engine.weight_bytes() as u64);
    }
}
