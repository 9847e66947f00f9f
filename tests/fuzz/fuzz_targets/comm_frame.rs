//! The comm link's frame decoder (`worker::comm::frame`) over any bytes a peer could send:
//! frames read in order until one is refused or the bytes end, never a panic (nor memory past
//! libFuzzer's limit: a length field that lies must not be allocated). Then the round trip:
//! the input's own bytes, read as f32s, come back bit for bit from `read(encode(..))`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use worker::comm::frame::{self, FrameError, HEADER};

fuzz_target!(|data: &[u8]| {
    let mut wire = data;
    let mut expected = 0u64;
    loop {
        let before = wire.len();
        let Ok(values) = frame::read(&mut wire, expected) else { break };
        // A frame read is its header and whole f32s, taken from the bytes that came.
        assert_eq!(before - wire.len(), HEADER + 4 * values.len());
        expected += 1;
    }

    let floats: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let seq = data.iter().fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let encoded = frame::encode(seq, &floats);
    assert_eq!(encoded.len(), HEADER + 4 * floats.len());
    let mut r = encoded.as_slice();
    let back = frame::read(&mut r, seq).expect("a frame encoded is read back");
    assert!(r.is_empty(), "the frame was read whole");
    assert_eq!(back.len(), floats.len());
    assert!(back.iter().zip(&floats).all(|(a, b)| a.to_bits() == b.to_bits()), "the values come back bit for bit");
    // Any other frame number is refused.
    assert!(matches!(frame::read(&mut encoded.as_slice(), seq.wrapping_add(1)), Err(FrameError::OutOfStep { .. })));
});
