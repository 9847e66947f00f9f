use super::*;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// `values` stored as `elem` (rounded to it), and the same rounded values as f32.
fn stored(values: &[f32], elem: Elem) -> (Vec<u8>, Vec<f32>) {
    let bytes: Vec<u8> = match elem {
        Elem::F32 => f32_bytes(values),
        Elem::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        Elem::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        Elem::I8 => values.iter().map(|&v| (v * 20.0).round().clamp(-127.0, 127.0) as i8 as u8).collect(),
        // Any byte but the two NaNs.
        Elem::E4m3 => values.iter().map(|&v| ((v * 1000.0) as i64).rem_euclid(256) as u8).map(|b| if b & 0x7F == 0x7F { 0 } else { b }).collect(),
    };
    let widened = bytes.chunks_exact(elem.bytes()).map(|b| elem.get(b, 0)).collect();
    (bytes, widened)
}

const ELEMS: [Elem; 5] = [Elem::F32, Elem::Bf16, Elem::F16, Elem::I8, Elem::E4m3];

#[test]
fn a_row_gets_the_same_bits_in_any_batch() {
    for (n, k) in [(37, 300), (12, 1553)] {
        let x: Vec<f32> = (0..70 * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 89.0).collect();
        for elem in ELEMS {
            let (w, _) = stored(&w, elem);
            let alone: Vec<Vec<f32>> = (0..70).map(|i| matmul_t(&x[i * k..(i + 1) * k], &w, elem, 1, n, k)).collect();
            for m in [2, 3, 4, 5, 8, 17, 64, 65, 70] {
                let batch = matmul_t(&x[..m * k], &w, elem, m, n, k);
                for i in 0..m {
                    assert_eq!(bits(&batch[i * n..(i + 1) * n]), bits(&alone[i]), "{elem:?}: row {i} in a batch of {m}");
                }
            }
        }
    }
}

/// Widening is exact, so a matrix of any element type gives the bits of its f32 copy.
#[test]
fn every_element_type_gives_the_bits_of_its_f32_copy() {
    for (m, n, k) in [(1, 9, 100), (1, 64, 1024), (3, 13, 1553), (8, 20, 800), (70, 5, 48)] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 89.0).collect();
        for elem in ELEMS {
            let (bytes, widened) = stored(&w, elem);
            let want = gemv_f32(&x, &widened, m, n, k);
            assert_eq!(bits(&matmul_t(&x, &bytes, elem, m, n, k)), bits(&want), "{elem:?} m{m} n{n} k{k}");
        }
    }
}

/// The blocked products of the portable kernels and of the set this CPU selects (with `x`
/// arranged as that set reads it).
fn portable_and_selected<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize, portable: &mut [f32], selected: &mut [f32]) {
    groups_portable::<S>(w, x, m, k, portable);
    let kernels = Kernels::<S>::select();
    (kernels.groups)(w, (kernels.arrange)(x, k).as_deref().unwrap_or(x), m, k, selected);
}

#[test]
fn the_portable_kernels_give_the_same_bits() {
    for (m, k) in [(1, 100), (2, 100), (5, 1553), (9, 64)] {
        let n = 12;
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 89.0).collect();
        for elem in ELEMS {
            let (w, _) = stored(&w, elem);
            let (mut portable, mut selected) = (vec![0f32; n * m], vec![0f32; n * m]);
            match elem {
                Elem::F32 => portable_and_selected::<F32>(&w, &x, m, k, &mut portable, &mut selected),
                Elem::Bf16 => portable_and_selected::<Bf16>(&w, &x, m, k, &mut portable, &mut selected),
                Elem::F16 => portable_and_selected::<F16>(&w, &x, m, k, &mut portable, &mut selected),
                Elem::I8 => portable_and_selected::<I8>(&w, &x, m, k, &mut portable, &mut selected),
                Elem::E4m3 => portable_and_selected::<E4m3>(&w, &x, m, k, &mut portable, &mut selected),
            }
            assert_eq!(bits(&portable), bits(&selected), "{elem:?} m{m} k{k}");
        }
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
        let bytes = f32_bytes(&w);
        for j in 0..n {
            let (row, x0) = (&bytes[j * k * 4..(j + 1) * k * 4], &x[..k]);
            let mut all = vec![dot_portable::<F32>(row, x0)];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: checked just above.
                    all.push(unsafe { x86::dot_f32_avx2(row, x0) });
                }
                if x86::has_avx512() {
                    // SAFETY: checked just above.
                    all.push(unsafe { x86::dot_avx512::<F32>(row, x0) });
                }
            }
            for v in all {
                assert_eq!(v.to_bits(), got[j].to_bits(), "k{k}: every kernel sums in the same order");
            }
        }
    }
}

#[test]
fn e4m3_values_follow_the_format() {
    assert_eq!(E4M3_VALUES[0x7E], 448.0);
    assert_eq!(E4M3_VALUES[0xFE], -448.0);
    assert_eq!(E4M3_VALUES[0x38], 1.0);
    assert_eq!(E4M3_VALUES[0x01], 2f32.powi(-9));
    assert_eq!(E4M3_VALUES[0x08], 2f32.powi(-6));
    assert!(E4M3_VALUES[0x7F].is_nan() && E4M3_VALUES[0xFF].is_nan());
    assert_eq!(E4M3_VALUES[0x80].to_bits(), (-0.0f32).to_bits());
    // Every non-NaN value, widened by the SIMD path too (a row of that byte).
    for b in 0..=255u8 {
        if b & 0x7F == 0x7F {
            continue;
        }
        let w = vec![b; 16];
        let x = vec![1.0f32; 16];
        assert_eq!(matmul_t(&x, &w, Elem::E4m3, 1, 1, 16)[0], E4M3_VALUES[b as usize] * 16.0, "byte {b:#04x}");
    }
}

/// Every kernel this CPU can run (AVX-512, AVX2, portable), called directly, for every
/// element type: the same bits.
#[test]
fn every_instruction_set_gives_the_same_bits() {
    fn all<S: Stored>(w: &[u8], x: &[f32], m: usize, k: usize) {
        let (row, x0) = (k * S::KIND.bytes(), x);
        let xs: [&[f32]; 4] = std::array::from_fn(|i| &x[i * k..(i + 1) * k]);
        let ws: [&[u8]; 4] = std::array::from_fn(|a| &w[a * row..(a + 1) * row]);
        let mut want_groups = vec![0f32; 4 * m];
        groups_portable::<S>(&w[..4 * row], x, m, k, &mut want_groups);
        let want = (dot_portable::<S>(ws[0], xs[0]), xs.map(|x| dot_portable::<S>(ws[0], x)), ws.map(|w| dot_portable::<S>(w, xs[0])));
        let sets = [("avx512", Kernels::<S>::avx512()), ("avx2", Kernels::<S>::avx2())];
        for (name, kernels) in sets.into_iter().filter_map(|(name, k)| Some((name, k?))) {
            let what = format!("{name} {:?} k{k}", S::KIND);
            let arranged = (kernels.arrange)(x, k);
            let x = arranged.as_deref().unwrap_or(x);
            let xs: [&[f32]; 4] = std::array::from_fn(|i| &x[i * k..(i + 1) * k]);
            assert_eq!((kernels.dot)(ws[0], xs[0]).to_bits(), want.0.to_bits(), "{what}: dot");
            assert_eq!(bits(&(kernels.dot4)(ws[0], xs)), bits(&want.1), "{what}: dot4");
            assert_eq!(bits(&(kernels.rows4)(ws, xs[0])), bits(&want.2), "{what}: rows4");
            let mut got = vec![0f32; 4 * m];
            (kernels.groups)(&w[..4 * row], x, m, k, &mut got);
            assert_eq!(bits(&got), bits(&want_groups), "{what}: groups");
            if let Some((few, most)) = kernels.few {
                // Twenty-nine weight rows: blocks of twelve, whole tiles of every height and
                // remainders; more than four x rows take passes over parts of each row.
                for rows in 1..=most.min(m) {
                    let mut got = vec![0f32; 29 * rows];
                    few(&w[..29 * row], &x[..rows * k], rows, k, &mut got);
                    let want: Vec<f32> = (0..29)
                        .flat_map(|r| (0..rows).map(move |i| (r, i)))
                        .map(|(r, i)| dot_portable::<S>(&w[r * row..(r + 1) * row], &x0[i * k..(i + 1) * k]))
                        .collect();
                    assert_eq!(bits(&got), bits(&want), "{what}: few, {rows} x rows");
                }
            }
        }
    }
    for k in [16, 100, 1553, 2100] {
        let m = 8;
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let w: Vec<f32> = (0..29 * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 89.0).collect();
        for elem in ELEMS {
            let (w, _) = stored(&w, elem);
            match elem {
                Elem::F32 => all::<F32>(&w, &x, m, k),
                Elem::Bf16 => all::<Bf16>(&w, &x, m, k),
                Elem::F16 => all::<F16>(&w, &x, m, k),
                Elem::I8 => all::<I8>(&w, &x, m, k),
                Elem::E4m3 => all::<E4m3>(&w, &x, m, k),
            }
        }
    }
}
