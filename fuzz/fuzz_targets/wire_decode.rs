//! Any bytes into the frame decoder: never a panic, and whatever decodes re-encodes to the same
//! bytes. Each frame header is fixed up before it is decoded (magic, a known version most of the
//! time, a payload length that fits in what is left, and the header CRC), so the decoders
//! behind the header's checks (page batch headers, runs, bitmaps) are what the fuzzer explores.
#![no_main]
use ferry_transport::wire::{
    decode_frame, encode_batch_frame, BatchFixed, Frame, FrameKind, HEADER_LEN, MAGIC, VERSION_MIN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut at = 0;
    while buf.len() - at >= HEADER_LEN {
        let left = (buf.len() - at - HEADER_LEN) as u32;
        let h = &mut buf[at..at + HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        // Bits of the version byte choose: 0x80 keep the fuzzer's version (the refusal path),
        // 0x40 keep its length for a page batch.
        let fix_batch_len = h[4] & 0x40 == 0 && h[5] == FrameKind::PageBatch as u8;
        if h[4] & 0x80 == 0 {
            h[4] = VERSION_MIN;
        }
        let mut len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) % (left + 1);
        if fix_batch_len {
            // A page batch's length is its header's to say: take it, if it fits.
            if let Ok(f) = BatchFixed::decode(&buf[at + HEADER_LEN..]) {
                if f.frame_len() as u64 <= u64::from(left) {
                    len = f.frame_len() as u32;
                }
            }
        }
        let h = &mut buf[at..at + HEADER_LEN];
        h[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&h[..12]);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        let rest = &buf[at..];
        match decode_frame(rest) {
            Ok(Some((frame, used))) => {
                if let Frame::Batch(h, payload) = &frame {
                    assert_eq!(&encode_batch_frame(h, payload)[..], &rest[..used]);
                }
                at += used;
            }
            _ => break,
        }
    }
});
