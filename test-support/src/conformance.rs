//! The conformance suite every channel backend passes. Each function takes a [`Backend`] (how to
//! make channel pairs of that backend) and panics with a message on a violation; backend test
//! files call each function from a `#[test]`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_memory::AnonMemory;
use ferry_transport::channel::{Channel, Incoming};
use ferry_transport::error::{HandshakeError, TransportError};
use ferry_transport::handshake::Psk;
use ferry_transport::wire::{
    encode_batch_frame, encode_frame, BatchHeader, Encoding, FrameKind, PageRun, BATCH_DEST_ZEROED, HEADER_LEN,
    PAGE_SIZE,
};
use ferry_transport::Encryption;
use ferry_vmm_glue::pagemix::{fill_page, Mix, PageKind};

/// The key the suite's pairs use.
pub const TEST_KEY: &[u8] = b"ferry-conformance-key-0123456789";

/// A peer that has completed a genuine handshake and then writes raw frames.
pub trait RawPeer: Send {
    /// Write a frame encoded in clear, sealed as the channel's own frames are (a frame cut
    /// short, or bytes that are no frame, go as they are: see
    /// `ferry_transport::crypto::Sealer::seal_encoded`).
    fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()>;
    /// Close the connection.
    fn close(&mut self);
    /// Seal a frame encoded in clear as this channel would, taking its sequence number, without
    /// sending it (`None`: the backend's raw peer cannot; the tamper tests then say SKIP).
    fn seal(&mut self, _frame: &[u8]) -> Option<Vec<u8>> {
        None
    }
    /// Write bytes exactly as given (a sealed frame from [`RawPeer::seal`], altered or not).
    fn write_wire(&mut self, _b: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// How to make channels of one backend.
pub trait Backend: Sync {
    /// Backend name.
    fn name(&self) -> &'static str;
    /// A connected (source, destination) pair, both with [`TEST_KEY`].
    fn pair(&self) -> Result<(Channel, Channel), TransportError>;
    /// Try a pair with these keys; returns (client result, server result).
    fn pair_keys(&self, client: Psk, server: Psk)
        -> (Result<Channel, TransportError>, Result<Channel, TransportError>);
    /// A raw peer on the source side and the destination channel.
    fn raw_pair(&self) -> Result<(Box<dyn RawPeer>, Channel), TransportError>;
    /// Does the destination accept zstd batches from the raw peer?
    fn zstd(&self) -> bool;
    /// Do data pages land before the batch is announced (one-sided RDMA writes)?
    fn one_sided(&self) -> bool {
        false
    }
    /// The encryption mode both ends of the pairs run.
    fn encryption(&self) -> Encryption {
        Encryption::Aead
    }
}

fn mixed_memory(pages: usize, seed: u64) -> Arc<AnonMemory> {
    let m = Arc::new(AnonMemory::new(pages * PAGE_SIZE, false).expect("mmap"));
    let mix = Mix::default();
    let mut buf = vec![0u8; PAGE_SIZE];
    for i in 0..pages {
        let k = mix.kind(seed, i as u64);
        if k != PageKind::Zero {
            fill_page(&mut buf, k, seed, i as u64);
            m.write_from(i * PAGE_SIZE, &buf);
        }
    }
    m
}

fn assert_same(a: &AnonMemory, b: &AnonMemory, what: &str) {
    let mut x = vec![0u8; PAGE_SIZE];
    let mut y = vec![0u8; PAGE_SIZE];
    for off in (0..a.len()).step_by(PAGE_SIZE) {
        a.read_into(off, &mut x);
        b.read_into(off, &mut y);
        assert!(x == y, "{what}: page {} differs", off / PAGE_SIZE);
    }
}

/// The data map of a batch, from one scan of each page.
fn data_map(src: &ferry_memory::MemoryMap, runs: &[PageRun]) -> Vec<u8> {
    let total: usize = runs.iter().map(|r| r.pages as usize).sum();
    let mut map = vec![0u8; total.div_ceil(8)];
    let mut i = 0;
    for r in runs {
        let run = src.lookup(r.gpa, r.len()).expect("run inside the source");
        let scanned = ferry_memory::scan::scan_slice(run, |p, s| {
            if !s.zero {
                map[(i + p) / 8] |= 1 << ((i + p) % 8);
            }
        });
        assert!(scanned, "runs are page aligned");
        i += r.pages as usize;
    }
    map
}

/// Batch shapes the suite sends: big contiguous, maximum size, scattered single pages.
fn shapes(pages: u32, base: u64) -> Vec<Vec<PageRun>> {
    let mut out = Vec::new();
    let mut p = 0u32;
    let mut turn = 0;
    while p < pages {
        let runs = match turn % 3 {
            0 => {
                let n = 256.min(pages - p);
                vec![PageRun { gpa: base + u64::from(p) * PAGE_SIZE as u64, pages: n }]
            }
            1 => {
                let n = 1024.min(pages - p);
                vec![PageRun { gpa: base + u64::from(p) * PAGE_SIZE as u64, pages: n }]
            }
            _ => {
                let n = 64.min(pages - p);
                (0..n).map(|i| PageRun { gpa: base + u64::from(p + i) * PAGE_SIZE as u64, pages: 1 }).collect()
            }
        };
        p += runs.iter().map(|r| r.pages).sum::<u32>();
        out.push(runs);
        turn += 1;
    }
    out
}

/// A large mixed page set (zero, text-like, random) crosses byte for byte: first into fresh
/// memory (zero pages not written), then again over garbage (zero pages must be zeroed).
pub fn round_trip_mixed(b: &dyn Backend) {
    const PAGES: usize = 8192; // 32 MiB
    const GPA: u64 = 0x1_0000_0000;
    let src = mixed_memory(PAGES, 42);
    let dst = Arc::new(AnonMemory::new(PAGES * PAGE_SIZE, true).expect("mmap"));
    let (smap, dmap) = (src.map_at(GPA).unwrap(), dst.map_at(GPA).unwrap());
    // Pass 0 into fresh memory; pass 1 over garbage; pass 2 over garbage with the caller's data
    // map (`send_batch_mapped`, as the engine sends after scanning).
    for pass in 0..3u32 {
        if pass >= 1 {
            let junk = vec![0xAAu8; PAGES * PAGE_SIZE];
            dst.write_from(0, &junk);
        }
        let (mut s, mut d) = b.pair().expect("pair");
        let batches = shapes(PAGES as u32, GPA);
        let n = batches.len();
        let flags = if pass == 0 { BATCH_DEST_ZEROED } else { 0 };
        std::thread::scope(|sc| {
            let dmap = &dmap;
            let recv = sc.spawn(move || {
                let mut got = 0;
                loop {
                    match d.rx.recv(dmap).expect("recv") {
                        Incoming::Batch(rb) => {
                            got += 1;
                            d.tx.send_ack(rb.ack()).expect("ack");
                        }
                        Incoming::Closed => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                d.tx.close().ok();
                got
            });
            let mut zero = 0u64;
            let mut data = 0u64;
            let mut compressed = 0;
            for (i, runs) in batches.iter().enumerate() {
                let sb = if pass == 2 {
                    let map = data_map(&smap, runs);
                    let mut bad = map.clone();
                    bad.push(0);
                    assert!(
                        s.tx.send_batch_mapped(i as u64, pass, flags, runs, &bad, &smap).is_err(),
                        "a data map of the wrong length was accepted"
                    );
                    s.tx.send_batch_mapped(i as u64, pass, flags, runs, &map, &smap).expect("send")
                } else {
                    s.tx.send_batch(i as u64, pass, flags, runs, &smap).expect("send")
                };
                zero += u64::from(sb.zero_pages);
                data += u64::from(sb.data_pages);
                compressed += usize::from(sb.compressed);
            }
            let mut acks = 0;
            while acks < n {
                match s.rx.recv(&smap).expect("ack recv") {
                    Incoming::Ack(a) => {
                        assert_eq!(a.round, pass);
                        acks += 1
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            s.tx.close().expect("close");
            assert_eq!(recv.join().expect("receiver"), n);
            assert_eq!(zero + data, PAGES as u64);
            let want_zero = (0..PAGES as u64).filter(|&i| Mix::default().kind(42, i) == PageKind::Zero).count() as u64;
            assert_eq!(zero, want_zero, "zero pages detected");
            if b.zstd() {
                assert!(compressed > 0, "zstd backend never compressed a mixed batch");
            } else {
                assert_eq!(compressed, 0);
            }
        });
        assert_same(&src, &dst, &format!("{} pass {pass}", b.name()));
    }
}

/// The source disappears in the middle of a batch: the destination gets a clean error, no hang.
pub fn peer_closes_mid_batch(b: &dyn Backend) {
    let (mut raw, mut d) = b.raw_pair().expect("raw pair");
    let dst = Arc::new(AnonMemory::new(1024 * PAGE_SIZE, true).unwrap());
    let dmap = dst.map_at(0).unwrap();
    let h = BatchHeader {
        id: 1,
        round: 0,
        encoding: Encoding::Raw,
        flags: 0,
        runs: vec![PageRun { gpa: 0, pages: 64 }],
        data_map: vec![0xff; 8],
        data_len: 64 * PAGE_SIZE as u32,
    };
    let f = encode_batch_frame(&h, &vec![7u8; 64 * PAGE_SIZE]);
    raw.write_raw(&f[..f.len() / 2]).unwrap();
    raw.close();
    let e = d.rx.recv(&dmap).expect_err("a half batch must fail");
    assert!(matches!(e, TransportError::Truncated | TransportError::Io(_) | TransportError::Closed), "{e}");
}

/// A reader that stops: the sender blocks with bounded memory, and everything arrives once the
/// reader resumes.
pub fn slow_reader_backpressure(b: &dyn Backend) {
    const PAGES: usize = 16384; // 64 MiB of random pages, 64 batches of 1 MiB
    let src = Arc::new(AnonMemory::new(PAGES * PAGE_SIZE, false).unwrap());
    let mut buf = vec![0u8; PAGE_SIZE];
    for i in 0..PAGES {
        fill_page(&mut buf, PageKind::Random, 9, i as u64);
        src.write_from(i * PAGE_SIZE, &buf);
    }
    let dst = Arc::new(AnonMemory::new(PAGES * PAGE_SIZE, true).unwrap());
    let (smap, dmap) = (src.map_at(0).unwrap(), dst.map_at(0).unwrap());
    let (mut s, mut d) = b.pair().expect("pair");
    let sent = Arc::new(AtomicU64::new(0));
    std::thread::scope(|sc| {
        let sent2 = sent.clone();
        let smap = &smap;
        let sender = sc.spawn(move || {
            for i in 0..(PAGES / 256) {
                let run = [PageRun { gpa: (i * 256 * PAGE_SIZE) as u64, pages: 256 }];
                s.tx.send_batch(i as u64, 0, BATCH_DEST_ZEROED, &run, smap).expect("send");
                sent2.fetch_add(1, Ordering::SeqCst);
            }
            s.tx.close().unwrap();
            s
        });
        // Reader idle: the sender must stall well short of the whole 64 MiB.
        let t = Instant::now();
        let mut last = u64::MAX;
        while t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(200));
            let now = sent.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
        }
        let stalled_at = sent.load(Ordering::SeqCst);
        assert!(
            stalled_at < (PAGES / 256) as u64 / 2,
            "sender pushed {stalled_at} MiB into a reader that reads nothing"
        );
        let mut got = 0;
        loop {
            match d.rx.recv(&dmap).expect("recv") {
                Incoming::Batch(_) => got += 1,
                Incoming::Closed => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, PAGES / 256);
        sender.join().unwrap();
    });
    assert_same(&src, &dst, "backpressure");
}

fn expect_refused(b: &dyn Backend, bytes: &[u8], what: &str, check: impl Fn(&TransportError) -> bool) {
    let (mut raw, mut d) = b.raw_pair().expect("raw pair");
    let dst = Arc::new(AnonMemory::new(16 * PAGE_SIZE, true).unwrap());
    let dmap = dst.map_at(0x10_0000).unwrap();
    raw.write_raw(bytes).unwrap();
    let e = d.rx.recv(&dmap).expect_err(what);
    assert!(check(&e), "{what}: wrong error {e}");
    for off in (0..dst.len()).step_by(8) {
        assert_eq!(dst.read_byte(off), 0, "{what}: memory written by a refused frame");
    }
    raw.close();
}

/// Malformed frames are refused with a clear error and write nothing.
pub fn malformed_frames(b: &dyn Backend) {
    let wire = |e: &TransportError| matches!(e, TransportError::Wire(_));
    let good = encode_frame(FrameKind::Control, b"hello");
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    expect_refused(b, &bad_magic, "bad magic", wire);
    let mut bad_crc = good.clone();
    bad_crc[9] ^= 0x40;
    expect_refused(b, &bad_crc, "bad header checksum", wire);
    // A length beyond the cap, with a valid CRC.
    let mut huge = ferry_transport::wire::FrameHeader::new(FrameKind::Control, 0).encode();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32fast::hash(&huge[0..12]);
    huge[12..16].copy_from_slice(&crc.to_le_bytes());
    expect_refused(b, &huge, "huge length", wire);
    // A batch whose bitmap disagrees with its data length.
    let h = BatchHeader {
        id: 1,
        round: 0,
        encoding: Encoding::Raw,
        flags: 0,
        runs: vec![PageRun { gpa: 0x10_0000, pages: 2 }],
        data_map: vec![0b01],
        data_len: 2 * PAGE_SIZE as u32,
    };
    expect_refused(b, &encode_batch_frame(&h, &vec![1u8; 2 * PAGE_SIZE]), "inconsistent batch", wire);
    // A batch aimed at memory the destination does not have.
    let h = BatchHeader {
        runs: vec![PageRun { gpa: 0x20_0000, pages: 1 }],
        data_map: vec![1],
        data_len: PAGE_SIZE as u32,
        ..h
    };
    expect_refused(b, &encode_batch_frame(&h, &vec![1u8; PAGE_SIZE]), "unmapped gpa", |e| {
        matches!(e, TransportError::BadAddress { .. })
    });
    // A batch straddling the end of the region.
    let h = BatchHeader {
        runs: vec![PageRun { gpa: 0x10_0000 + 15 * PAGE_SIZE as u64, pages: 2 }],
        data_map: vec![0b11],
        data_len: 2 * PAGE_SIZE as u32,
        ..h
    };
    expect_refused(b, &encode_batch_frame(&h, &vec![1u8; 2 * PAGE_SIZE]), "batch past the region", |e| {
        matches!(e, TransportError::BadAddress { .. })
    });
    // Compressed data that is garbage (or zstd not negotiated).
    let h = BatchHeader {
        encoding: Encoding::Zstd,
        runs: vec![PageRun { gpa: 0x10_0000, pages: 1 }],
        data_map: vec![1],
        data_len: 100,
        ..h
    };
    expect_refused(b, &encode_batch_frame(&h, &[0x55u8; 100]), "garbage zstd", |e| {
        matches!(e, TransportError::Decompress(_) | TransportError::NotNegotiated(_))
    });
    // A handshake frame after the handshake.
    expect_refused(b, &encode_frame(FrameKind::ClientHello, &[0u8; 8]), "late hello", wire);
    let _ = HEADER_LEN;
}

/// A wrong key fails the handshake on both sides with an authentication error.
pub fn wrong_key(b: &dyn Backend) {
    let (c, s) =
        b.pair_keys(Psk::new(TEST_KEY).unwrap(), Psk::new(b"another-key-entirely-0123456789!".to_vec()).unwrap());
    let ce = c.expect_err("client with the wrong key");
    assert!(matches!(ce, TransportError::Handshake(HandshakeError::BadMac)), "client: {ce}");
    assert!(s.is_err(), "server accepted a client with the wrong key");
}

/// An abort reaches the peer with its reason; control messages cross intact.
pub fn control_and_abort(b: &dyn Backend) {
    let (mut s, mut d) = b.pair().expect("pair");
    let dst = Arc::new(AnonMemory::new(PAGE_SIZE, true).unwrap());
    let dmap = dst.map_at(0).unwrap();
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.tx.send_control(&msg).unwrap();
    assert_eq!(d.rx.recv(&dmap).unwrap(), Incoming::Control(msg));
    s.tx.send_abort(7, "source cancelled").unwrap();
    match d.rx.recv(&dmap) {
        Err(TransportError::PeerAborted { code: 7, reason }) => assert_eq!(reason, "source cancelled"),
        other => panic!("expected abort, got {other:?}"),
    }
}

/// A sink that admits batches of rounds before `refuse_from` and refuses the rest.
struct RefusingSink<'a> {
    map: &'a ferry_memory::MemoryMap,
    refuse_from: u32,
}

// SAFETY: every slice and region comes from the wrapped map, under its own promise.
unsafe impl ferry_memory::MemorySink for RefusingSink<'_> {
    fn sink_slice(&self, gpa: u64, len: usize) -> Option<ferry_memory::VolatileSlice<'_>> {
        self.map.sink_slice(gpa, len)
    }
    fn regions(&self) -> &[ferry_memory::Region] {
        ferry_memory::MemorySink::regions(self.map)
    }
    fn admit_batch(&self, round: u32) -> Result<(), String> {
        if round >= self.refuse_from {
            Err(format!("round {round} refused"))
        } else {
            Ok(())
        }
    }
}

/// A batch the receiver refuses (`MemorySink::admit_batch`: a stale round, sealed memory) fails
/// the receive with `BatchRefused` before its pages are written: memory keeps what it held (on a
/// one-sided backend the data pages landed before the announcement, but its zero pages are still
/// not written); an admitted batch before it lands whole.
pub fn refused_batch(b: &dyn Backend) {
    const PAGES: usize = 64;
    let src = mixed_memory(PAGES, 7);
    let dst = Arc::new(AnonMemory::new(PAGES * PAGE_SIZE, true).unwrap());
    dst.write_from(0, &vec![0xAAu8; PAGES * PAGE_SIZE]);
    let (smap, dmap) = (src.map_at(0).unwrap(), dst.map_at(0).unwrap());
    let (mut s, mut d) = b.pair().expect("pair");
    let half = (PAGES / 2) as u32;
    let first = [PageRun { gpa: 0, pages: half }];
    let second = [PageRun { gpa: u64::from(half) * PAGE_SIZE as u64, pages: half }];
    let sink = RefusingSink { map: &dmap, refuse_from: 1 };
    // The sender runs on its own thread: a one-sided backend's first send waits for the region
    // table, which the receiver sends on its first receive.
    std::thread::scope(|sc| {
        let smap = &smap;
        let tx = &mut s.tx;
        let sender = sc.spawn(move || {
            tx.send_batch(1, 0, 0, &first, smap).expect("send round 0");
            tx.send_batch(2, 1, 0, &second, smap).expect("send round 1");
        });
        match d.rx.recv(&sink) {
            Ok(Incoming::Batch(rb)) => assert_eq!((rb.id, rb.round), (1, 0)),
            other => panic!("{}: round 0 should be admitted, got {other:?}", b.name()),
        }
        match d.rx.recv(&sink) {
            Err(TransportError::BatchRefused(why)) => assert!(why.contains("round 1"), "{why}"),
            other => panic!("{}: round 1 should be refused, got {other:?}", b.name()),
        }
        sender.join().expect("sender");
    });
    let (mut x, mut y) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for p in 0..PAGES {
        src.read_into(p * PAGE_SIZE, &mut x);
        dst.read_into(p * PAGE_SIZE, &mut y);
        if p < half as usize {
            assert!(x == y, "{}: admitted page {p} differs", b.name());
        } else if !b.one_sided() || x.iter().all(|&v| v == 0) {
            assert!(y.iter().all(|&v| v == 0xAA), "{}: refused batch wrote page {p}", b.name());
        }
    }
}

/// Sealed channels (`aead`, `integrity`): a frame that is altered (payload, tag, header or a
/// batch's runs), replayed, reordered, dropped, injected in clear or moved from another channel
/// is refused as [`TransportError::Unauthenticated`]; an altered batch header is refused before
/// any guest memory is written.
pub fn tampered_frames(b: &dyn Backend) {
    if b.encryption() == Encryption::Off {
        println!("SKIP: tampered_frames on {}: encryption off authenticates nothing", b.name());
        return;
    }
    let unauth = |e: &TransportError| matches!(e, TransportError::Unauthenticated);
    let dst = Arc::new(AnonMemory::new(16 * PAGE_SIZE, true).unwrap());
    let dmap = dst.map_at(0x10_0000).unwrap();
    let zero = |what: &str| {
        for off in (0..dst.len()).step_by(8) {
            assert_eq!(dst.read_byte(off), 0, "{what}: memory written by a refused frame");
        }
    };
    let control = |m: &[u8]| encode_frame(FrameKind::Control, m);
    let batch = {
        let h = BatchHeader {
            id: 1,
            round: 0,
            encoding: Encoding::Raw,
            flags: 0,
            runs: vec![PageRun { gpa: 0x10_0000, pages: 3 }],
            data_map: vec![0b101],
            data_len: 2 * PAGE_SIZE as u32,
        };
        encode_batch_frame(&h, &vec![0x5au8; 2 * PAGE_SIZE])
    };
    // Each case: frames sealed in order on a fresh channel, what goes on the wire, and whether
    // the first frame is expected through before the refusal.
    type Case = (&'static str, Box<dyn Fn(&[Vec<u8>]) -> (Vec<u8>, usize)>);
    let cases: Vec<Case> = vec![
        ("flipped payload byte", Box::new(|f| (flip(&f[0], HEADER_LEN + 2), 0))),
        ("flipped tag byte", Box::new(|f| (flip(&f[0], f[0].len() - 1), 0))),
        ("flipped header length bit", Box::new(|f| (fix_crc(flip(&f[0], 8)), 0))),
        ("replayed frame", Box::new(|f| ([f[0].clone(), f[0].clone()].concat(), 1))),
        ("reordered frames", Box::new(|f| ([f[1].clone(), f[0].clone()].concat(), 0))),
        ("dropped frame", Box::new(|f| (f[1].clone(), 0))),
    ];
    for (what, make) in cases {
        let Some((mut raw, mut d)) = sealing_pair(b, what) else { return };
        let sealed: Vec<Vec<u8>> = [control(b"one"), control(b"two")].iter().map(|f| raw.seal(f).unwrap()).collect();
        let (wire, ok_first) = make(&sealed);
        raw.write_wire(&wire).unwrap();
        for _ in 0..ok_first {
            assert_eq!(d.rx.recv(&dmap).expect(what), Incoming::Control(b"one".to_vec()), "{what}");
        }
        let e = d.rx.recv(&dmap).expect_err(what);
        assert!(unauth(&e) || (what.contains("length") && matches!(e, TransportError::Wire(_))), "{what}: {e}");
        raw.close();
    }
    // A frame injected in clear.
    let Some((mut raw, mut d)) = sealing_pair(b, "injected") else { return };
    raw.write_wire(&control(b"let me in")).unwrap();
    let e = d.rx.recv(&dmap).expect_err("injected frame");
    assert!(unauth(&e), "injected frame: {e}");
    raw.close();
    // A frame sealed for another channel (same key, same session id: other nonces, other keys).
    let (Some((mut a, _da)), Some((mut other, mut d))) = (sealing_pair(b, "cross"), sealing_pair(b, "cross")) else {
        return;
    };
    let f = a.seal(&control(b"for channel a")).unwrap(); // sequence 0, as `other`'s receiver expects
    other.write_wire(&f).unwrap();
    let e = d.rx.recv(&dmap).expect_err("frame from another channel");
    assert!(unauth(&e), "frame from another channel: {e}");
    a.close();
    other.close();
    // An altered batch: in its runs (refused before memory is touched), in its data (refused).
    let Some((mut raw, mut d)) = sealing_pair(b, "batch") else { return };
    let s = raw.seal(&batch).unwrap();
    raw.write_wire(&flip(&s, HEADER_LEN + 24 + 16 + 1)).unwrap(); // a byte of the run's GPA
    let e = d.rx.recv(&dmap).expect_err("altered batch header");
    assert!(unauth(&e), "altered batch header: {e}");
    zero("altered batch header");
    raw.close();
    let Some((mut raw, mut d)) = sealing_pair(b, "batch data") else { return };
    let s = raw.seal(&batch).unwrap();
    let at = s.len() - 100;
    raw.write_wire(&flip(&s, at)).unwrap();
    let e = d.rx.recv(&dmap).expect_err("altered batch data");
    assert!(unauth(&e), "altered batch data: {e}");
    raw.close();
    // The same batch unaltered arrives whole.
    let Some((mut raw, mut d)) = sealing_pair(b, "batch") else { return };
    let s = raw.seal(&batch).unwrap();
    raw.write_wire(&s).unwrap();
    assert!(matches!(d.rx.recv(&dmap).expect("intact batch"), Incoming::Batch(_)));
    assert_eq!(dst.read_byte(0), 0x5a);
    assert_eq!(dst.read_byte(PAGE_SIZE), 0);
    assert_eq!(dst.read_byte(2 * PAGE_SIZE + 7), 0x5a);
    raw.close();
    // A batch whose data section is read and opened in several pieces (a 40-page segment longer
    // than one piece, then 56 one-page segments between zero pages): altered in its last piece,
    // or in the tag of a segment in the middle, it is refused; unaltered, every page arrives.
    const BIG: usize = 152;
    let big_dst = Arc::new(AnonMemory::new(BIG * PAGE_SIZE, true).unwrap());
    let big_map = big_dst.map_at(0x40_0000).unwrap();
    let is_data = |p: usize| p < 40 || p % 2 == 0;
    let mut bitmap = vec![0u8; BIG.div_ceil(8)];
    let mut data = Vec::new();
    for p in (0..BIG).filter(|&p| is_data(p)) {
        bitmap[p / 8] |= 1 << (p % 8);
        data.extend((0..PAGE_SIZE).map(|i| (p * 7 + i / 64) as u8 | 1));
    }
    let big = encode_batch_frame(
        &BatchHeader {
            id: 2,
            round: 0,
            encoding: Encoding::Raw,
            flags: 0,
            runs: vec![PageRun { gpa: 0x40_0000, pages: BIG as u32 }],
            data_map: bitmap,
            data_len: data.len() as u32,
        },
        &data,
    );
    let fixed_and_runs = HEADER_LEN + 24 + 16 + 12 + BIG.div_ceil(8) + 16;
    for (what, at) in [("big batch, last piece", usize::MAX), ("big batch, a middle tag", fixed_and_runs + 16 * 30 + 3)]
    {
        let Some((mut raw, mut d)) = sealing_pair(b, what) else { return };
        let s = raw.seal(&big).unwrap();
        let at = if at == usize::MAX { s.len() - 5 } else { at };
        raw.write_wire(&flip(&s, at)).unwrap();
        let e = d.rx.recv(&big_map).expect_err(what);
        assert!(unauth(&e), "{what}: {e}");
        raw.close();
    }
    let Some((mut raw, mut d)) = sealing_pair(b, "big batch") else { return };
    let s = raw.seal(&big).unwrap();
    raw.write_wire(&s).unwrap();
    match d.rx.recv(&big_map).expect("intact big batch") {
        Incoming::Batch(rb) => assert_eq!((rb.pages, rb.data_pages), (BIG as u32, 96)),
        other => panic!("{}: intact big batch: {other:?}", b.name()),
    }
    let (mut got, mut off) = (vec![0u8; PAGE_SIZE], 0);
    for p in 0..BIG {
        big_dst.read_into(p * PAGE_SIZE, &mut got);
        if is_data(p) {
            assert!(got == data[off..off + PAGE_SIZE], "{}: big batch page {p} differs", b.name());
            off += PAGE_SIZE;
        } else {
            assert!(got.iter().all(|&v| v == 0), "{}: big batch zero page {p} not zero", b.name());
        }
    }
    raw.close();
}

fn sealing_pair(b: &dyn Backend, what: &str) -> Option<(Box<dyn RawPeer>, Channel)> {
    let (mut raw, d) = b.raw_pair().expect("raw pair");
    if raw.seal(&encode_frame(FrameKind::Goodbye, &[])).is_none() {
        println!("SKIP: tampered_frames ({what}) on {}: its raw peer cannot seal frames", b.name());
        return None;
    }
    // That Goodbye was sealed and never sent: start over on a channel whose sequence is unused.
    raw.close();
    drop(d);
    Some(b.raw_pair().expect("raw pair"))
}

fn flip(f: &[u8], at: usize) -> Vec<u8> {
    let mut v = f.to_vec();
    v[at] ^= 0x10;
    v
}

/// Recompute a header's CRC after an edit (so the change reaches the tag check).
fn fix_crc(mut f: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&f[0..12]);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    f
}

/// Run the whole suite.
pub fn run_all(b: &dyn Backend) {
    round_trip_mixed(b);
    peer_closes_mid_batch(b);
    slow_reader_backpressure(b);
    malformed_frames(b);
    wrong_key(b);
    control_and_abort(b);
    refused_batch(b);
    tampered_frames(b);
}
