//! The batch receive path as the destination runs it: `StreamRx::recv` (frame header, batch
//! header, address checks, the raw `readv` into guest memory or the zstd path's decompression
//! and scatter) reading one page batch from a socket into a small guest memory.
//!
//! The input describes a batch (runs, which pages carry data, their contents, raw or zstd, the
//! flags, whether zstd was negotiated), which is encoded the way a sender encodes it (zstd data
//! compressed for real, so decompression runs) and then altered by the input's edits (bytes
//! overwritten at chosen offsets, or the frame cut short); the frame header's CRC is fixed up
//! after the edits, so the decoders behind it run. The frame goes through a unix socket pair (an
//! in-kernel, in-memory channel; the receive path only reads the descriptor). Never a panic or a
//! hang; a batch received unedited lands exactly: data pages hold what was sent, zero pages
//! hold zeros.
#![no_main]
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use ferry_memory::AnonMemory;
use ferry_transport::channel::{ChannelRx, Incoming};
use ferry_transport::stream::StreamRx;
use ferry_transport::wire::{
    encode_batch_frame, BatchHeader, Encoding, PageRun, BATCH_DEST_ZEROED, HEADER_LEN, PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

/// Guest memory of the receiver: pages at GPA 0.
const GUEST_PAGES: u64 = 48;

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

/// A connected pair of stream sockets: (writer, reader as the receive path takes it).
fn socket_pair() -> (std::os::unix::net::UnixStream, TcpStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let fd = std::os::fd::IntoRawFd::into_raw_fd(b);
    // SAFETY: `fd` is an open stream socket we own (moved out of `b`); StreamRx only reads it
    // (read, readv), which a unix stream socket supports like a TCP one.
    let reader = unsafe { TcpStream::from_raw_fd(fd) };
    (a, reader)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mode = inp.byte();
    let zeroed = mode & 2 != 0;
    let zstd_allowed = mode & 4 == 0;
    let out_of_range = mode & 8 != 0;
    let nruns = 1 + inp.byte() as usize % 6;
    let mut runs = Vec::new();
    let mut next = 0u64;
    for _ in 0..nruns {
        let (page, pages) = if out_of_range {
            // Anywhere, overlapping or outside guest memory: only "no panic" is checked.
            (u64::from(inp.byte()), 1 + u64::from(inp.byte()) % 64)
        } else {
            // Ascending, disjoint, inside guest memory: the batch must land exactly.
            let page = next + u64::from(inp.byte()) % 4;
            if page >= GUEST_PAGES {
                break;
            }
            (page, 1 + u64::from(inp.byte()) % (GUEST_PAGES - page).min(16))
        };
        next = page + pages;
        runs.push(PageRun { gpa: page * PAGE_SIZE as u64, pages: pages as u32 });
    }
    let total: usize = runs.iter().map(|r| r.pages as usize).sum();
    let mut data_map = vec![0u8; total.div_ceil(8)];
    for b in data_map.iter_mut() {
        *b = inp.byte();
    }
    if total % 8 != 0 {
        *data_map.last_mut().unwrap() &= (1u8 << (total % 8)) - 1;
    }
    let is_data = |i: usize| data_map[i / 8] & (1 << (i % 8)) != 0;
    // Page contents: a byte pattern per data page (compressible for zstd, or not).
    let seed = inp.byte();
    let mut raw = Vec::new();
    for i in (0..total).filter(|&i| is_data(i)) {
        let v = seed.wrapping_add(i as u8);
        raw.extend((0..PAGE_SIZE).map(|j| if seed & 1 == 0 { v } else { v ^ (j as u8).wrapping_mul(31) }));
    }
    // A sender compresses only a batch that carries data (zstd with no data is refused).
    let zstd = mode & 1 != 0 && !raw.is_empty();
    let section = if zstd { zstd::bulk::compress(&raw, 1).expect("compress") } else { raw.clone() };
    let h = BatchHeader {
        id: u64::from(inp.byte()),
        round: u32::from(inp.byte()),
        encoding: if zstd { Encoding::Zstd } else { Encoding::Raw },
        flags: if zeroed { BATCH_DEST_ZEROED } else { 0 },
        runs: runs.clone(),
        data_map: data_map.clone(),
        data_len: section.len() as u32,
    };
    let mut frame = encode_batch_frame(&h, &section);
    // Edits: (offset, value) pairs, then maybe a cut.
    let edits = inp.byte() % 8;
    for _ in 0..edits {
        let at = (usize::from(inp.byte()) << 8 | usize::from(inp.byte())) % frame.len();
        frame[at] = inp.byte();
    }
    let cut = inp.byte();
    if cut & 0x80 != 0 {
        frame.truncate(usize::from(cut & 0x7f).min(frame.len()));
    }
    if frame.len() >= HEADER_LEN {
        let crc = crc32fast::hash(&frame[..12]);
        frame[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    let edited = edits > 0 || cut & 0x80 != 0;

    let mem = Arc::new(AnonMemory::new(GUEST_PAGES as usize * PAGE_SIZE, false).expect("mmap"));
    mem.write_from(0, &vec![0xAAu8; GUEST_PAGES as usize * PAGE_SIZE]);
    let map = mem.map_at(0).expect("map");
    let (mut w, r) = socket_pair();
    // The frame is at most a few hundred KiB: a writer thread feeds it while the receiver reads.
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = w.write_all(&frame);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    // Unsealed framing (`Encryption::Off`): the fuzzer reaches the batch decoder without forging tags;
    // the sealed path is covered by the conformance suite's tampered-frame cases.
    let mut rx = StreamRx::new(r, zstd_allowed, ferry_transport::crypto::Sealer::off()).expect("stream rx");
    let got = rx.recv(&map);
    drop(rx); // a receive that failed mid-frame leaves bytes unread: the writer must not block
    writer.join().expect("writer");
    if edited || out_of_range {
        return;
    }
    match got {
        Ok(Incoming::Batch(b)) => {
            assert_eq!(b.runs, runs);
            assert_eq!(b.data_pages as usize, raw.len() / PAGE_SIZE);
        }
        other if runs.is_empty() || (zstd && !zstd_allowed) => {
            assert!(other.is_err(), "an empty or unnegotiated batch was accepted: {other:?}");
            return;
        }
        other => panic!("an unedited batch failed: {other:?}"),
    }
    let mut page = vec![0u8; PAGE_SIZE];
    let mut off = 0;
    let mut i = 0;
    for r in &runs {
        for p in 0..r.pages as usize {
            mem.read_into(r.gpa as usize + p * PAGE_SIZE, &mut page);
            if is_data(i) {
                assert!(page == raw[off..off + PAGE_SIZE], "data page {i} differs");
                off += PAGE_SIZE;
            } else {
                let want = if zeroed { 0xAA } else { 0 };
                assert!(page.iter().all(|&v| v == want), "zero page {i}: expected {want:#x}");
            }
            i += 1;
        }
    }
});
