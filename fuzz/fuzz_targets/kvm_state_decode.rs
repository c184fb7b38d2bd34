//! The KVM VMM's state decoder (`ferry_vmm_glue::kvm::state::decode`), which takes the VM state
//! a source sends: never a panic, and what decodes re-encodes to a blob that decodes the same.
//!
//! The input is the blob's sections (tag, length, bytes...); the target writes the magic, the
//! version and a section count in front (the first input byte picks the count, and with its top
//! bit set the input is taken whole, header and all) and the CRC behind, so the section decoders
//! behind the CRC are what the fuzzer explores.
#![no_main]
use ferry_vmm_glue::kvm::state::{decode, encode, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let mut blob = Vec::with_capacity(data.len() + 20);
    if first & 0x80 == 0 {
        blob.extend_from_slice(&MAGIC);
        blob.extend_from_slice(&VERSION.to_le_bytes());
        blob.extend_from_slice(&u32::from(first % 32).to_le_bytes());
    }
    blob.extend_from_slice(rest);
    let crc = crc32fast::hash(&blob);
    blob.extend_from_slice(&crc.to_le_bytes());
    if let Ok(s) = decode(&blob) {
        let again = encode(&s);
        let s2 = decode(&again).expect("a re-encoded state decodes");
        assert_eq!(encode(&s2), again, "decode(encode(s)) is not s");
    }
});
