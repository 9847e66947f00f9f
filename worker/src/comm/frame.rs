//! The TCP communicator's wire format: a link carries frames of f32 values, each one
//! `[number: u64 LE][payload bytes: u64 LE][payload: f32 LE ...]`, numbered from 0 on each
//! side of a link. A frame out of order (a peer running other operations) or of a length that
//! is not whole f32s is refused; a frame's memory grows with the bytes that actually arrive,
//! so a length field that lies cannot make the reader allocate it.

use std::io::Read;

/// The bytes before a frame's payload.
pub const HEADER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("out of step: frame {seq} of {bytes} bytes, expected frame {expected}")]
    OutOfStep { seq: u64, bytes: u64, expected: u64 },
}

/// Frame number `seq` carrying `data`.
pub fn encode(seq: u64, data: &[f32]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + data.len() * 4);
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend_from_slice(&((data.len() * 4) as u64).to_le_bytes());
    for v in data {
        frame.extend_from_slice(&v.to_le_bytes());
    }
    frame
}

/// Reads the next frame, which must be number `expected`.
pub fn read(r: &mut impl Read, expected: u64) -> Result<Vec<f32>, FrameError> {
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header)?;
    let seq = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let bytes = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    if seq != expected || !bytes.is_multiple_of(4) {
        return Err(FrameError::OutOfStep { seq, bytes, expected });
    }
    // Capacity for what a frame of activations usually holds; more as it arrives.
    let mut payload = Vec::with_capacity(bytes.min(1 << 20) as usize);
    r.take(bytes).read_to_end(&mut payload)?;
    if (payload.len() as u64) < bytes {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(payload.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_order() {
        let mut wire = encode(0, &[1.5, -2.0]);
        wire.extend(encode(1, &[]));
        let mut r = wire.as_slice();
        assert_eq!(read(&mut r, 0).unwrap(), vec![1.5, -2.0]);
        assert_eq!(read(&mut r, 1).unwrap(), Vec::<f32>::new());
        assert!(matches!(read(&mut r, 2), Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn a_frame_out_of_order_or_of_partial_floats_is_refused() {
        let wire = encode(3, &[1.0]);
        assert!(matches!(read(&mut wire.as_slice(), 2), Err(FrameError::OutOfStep { seq: 3, bytes: 4, expected: 2 })));
        let mut odd = encode(0, &[1.0]);
        odd[8] = 3;
        assert!(matches!(read(&mut odd.as_slice(), 0), Err(FrameError::OutOfStep { bytes: 3, .. })));
    }

    /// A header that claims an enormous payload and then ends allocates only what came.
    #[test]
    fn a_lying_length_is_an_eof_not_an_allocation() {
        let mut wire = encode(0, &[1.0, 2.0]);
        wire[8..16].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(matches!(read(&mut wire.as_slice(), 0), Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof));
    }
}
