//! Any bytes into the frame decoder: never a panic, and whatever decodes re-encodes to the same bytes.
#![no_main]
use ferry_transport::wire::{decode_frame, encode_batch_frame, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode_frame(rest) {
        if let Frame::Batch(h, payload) = &frame {
            assert_eq!(&encode_batch_frame(h, payload)[..], &rest[..used]);
        }
        rest = &rest[used..];
    }
});
