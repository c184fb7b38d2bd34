//! The quick-migration image reader (`ferry_migrate::quick::read_image`, what `quick_load` runs
//! on a file from the shared directory): never a panic, a hang or a write outside the guest's
//! memory, and an image read back unedited gives the guest's pages and state exactly.
//!
//! The input describes a small guest (regions, page contents, state), whose image is written by
//! the real writer (`write_image_to`), then altered by the input's edits (bytes overwritten at
//! chosen offsets, or the image cut short); every CRC the edits broke is fixed up (header, each
//! chunk, the end record, found by walking the format as written), so the parsers behind the
//! CRCs run. With the top bit of the first byte the input itself is the image.
#![no_main]
use std::sync::Arc;

use ferry_memory::{AnonMemory, MemoryMap};
use ferry_migrate::quick::{read_image, write_image_to, QuickError};
use ferry_migrate::vm::VmShape;
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;
/// Most guest pages the reader may ask memory for.
const MAX_PAGES: u64 = 64;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn fix_crc(img: &mut [u8], start: usize, end: usize) -> bool {
    if end + 4 > img.len() {
        return false;
    }
    let crc = crc32fast::hash(&img[start..end]);
    img[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    true
}

/// Recompute every CRC of `img`, walking it as the format says.
fn fix_crcs(img: &mut [u8]) {
    let Some(blen) = u32_at(img, 12) else { return };
    let mut at = 16 + blen as usize;
    if !fix_crc(img, 0, at) {
        return;
    }
    at += 4;
    loop {
        match img.get(at..at + 4) {
            Some(b"CHNK") => {
                let Some(n) = u32_at(img, at + 12) else { return };
                let n = (n as usize).min(1 << 16);
                let words = n.div_ceil(64);
                let Some(bm) = img.get(at + 16..at + 16 + words * 8) else { return };
                let present: usize = bm
                    .chunks_exact(8)
                    .enumerate()
                    .map(|(w, c)| {
                        let mut x = u64::from_le_bytes(c.try_into().unwrap());
                        if w == words - 1 && n % 64 != 0 {
                            x &= (1u64 << (n % 64)) - 1;
                        }
                        x.count_ones() as usize
                    })
                    .sum();
                let end = at + 16 + words * 8 + present * PAGE;
                if !fix_crc(img, at, end) {
                    return;
                }
                at = end + 4;
            }
            Some(b"END!") => {
                fix_crc(img, at, at + 20);
                return;
            }
            _ => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mode = inp.byte();
    let mut img = Vec::new();
    let mut want: Option<(VmShape, Vec<u8>, Vec<Arc<AnonMemory>>)> = None;
    if mode & 0x80 != 0 {
        img.extend_from_slice(inp.0);
    } else {
        let nreg = 1 + usize::from(inp.byte() % 3);
        let regions: Vec<(u64, u64)> =
            (0..nreg).map(|i| ((i as u64) << 20, (1 + u64::from(inp.byte()) % 20) * PAGE as u64)).collect();
        let shape = VmShape { vm_id: "fuzz-vm".into(), regions };
        let mems = memory_for(&shape).expect("mmap");
        // Some pages carry data (a pattern from the input), the rest stay zero.
        for m in &mems {
            for p in 0..m.len() / PAGE {
                let b = inp.byte();
                if b & 1 != 0 {
                    m.write_from(p * PAGE, &vec![b; PAGE]);
                }
            }
        }
        let state: Vec<u8> = (0..inp.byte() % 64).map(|i| i ^ mode).collect();
        let src = map_of(&shape, &mems);
        write_image_to(&mut img, &shape, &state, &src).expect("writing an image into a Vec");
        let edits = inp.byte() % 8;
        for _ in 0..edits {
            let at = (usize::from(inp.byte()) << 8 | usize::from(inp.byte())) % img.len();
            img[at] = inp.byte();
        }
        let cut = inp.byte();
        if cut & 0x80 != 0 {
            let keep = img.len() * usize::from(cut & 0x7f) / 128;
            img.truncate(keep);
        }
        fix_crcs(&mut img);
        if edits == 0 && cut & 0x80 == 0 {
            want = Some((shape, state, mems));
        }
    }
    let mut dst: Vec<Arc<AnonMemory>> = Vec::new();
    let r = read_image(&mut &img[..], |shape| {
        let pages = shape.memory_bytes() / PAGE as u64;
        if shape.regions.len() > 3 || pages > MAX_PAGES {
            return Err(QuickError::BadImage("too large for the fuzz target".into()));
        }
        dst = memory_for(shape).map_err(|e| QuickError::BadImage(e.to_string()))?;
        Ok(map_of(shape, &dst))
    });
    if let Some((shape, state, mems)) = want {
        let (got_shape, got_state, _) = r.expect("an unedited image reads back");
        assert_eq!(got_shape, shape);
        assert_eq!(got_state, state);
        let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
        for (m, d) in mems.iter().zip(&dst) {
            for off in (0..m.len()).step_by(PAGE) {
                m.read_into(off, &mut a);
                d.read_into(off, &mut b);
                assert!(a == b, "page at {off:#x} differs after the round trip");
            }
        }
    }
});

/// Fresh zeroed memory for each region of `shape`.
fn memory_for(shape: &VmShape) -> Result<Vec<Arc<AnonMemory>>, ferry_memory::MemoryError> {
    shape.regions.iter().map(|&(_, len)| AnonMemory::new(len as usize, false).map(Arc::new)).collect()
}

/// The map of `shape`'s regions onto `mems`.
fn map_of(shape: &VmShape, mems: &[Arc<AnonMemory>]) -> MemoryMap {
    MemoryMap::from_anon(shape.regions.iter().map(|r| r.0).zip(mems.iter().cloned())).expect("map")
}
