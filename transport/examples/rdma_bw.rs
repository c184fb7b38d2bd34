//! Throughput of the rdma backend's RDMA WRITE path, to set beside `ib_write_bw` at the same
//! message size (one batch = one message: `--size` bytes of data pages in one run).
//!
//! `FERRY_RDMA_DEVICE=rxe0 rdma_bw --size 1048576 --seconds 5 [--working-set BYTES] [--round-batches N]`
//!
//! `--round-batches N` ends a round every N messages (`ChannelTx::end_round`: the destination
//! invalidates its memory windows and binds fresh ones for the next round), so the run pays the
//! per-round window cost as a migration with rounds of N batches would; 0 (default) is one round.
//! Prints a table line and a JSON line. Without a device it prints SKIP and exits 0.

use std::time::{Duration, Instant};

use ferry_memory::AnonMemory;
use ferry_test_support::pagemix::{fill_page, PageKind};
use ferry_transport::handshake::{Caps, ChannelBinding, ClientConfig, Psk, ServerConfig};
use ferry_transport::rdma::{self, RdmaAcceptor, RdmaOptions};
use ferry_transport::wire::{PageRun, BATCH_DEST_ZEROED, MAX_BATCH_PAGES, PAGE_SIZE};
use ferry_transport::Incoming;
use std::sync::Arc;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if let Some(r) = rdma::skip_reason() {
        println!("SKIP: rdma_bw: {r}");
        return;
    }
    let size = arg("--size", 1 << 20) as usize;
    let seconds = arg("--seconds", 5);
    let pages = (size / PAGE_SIZE).clamp(1, MAX_BATCH_PAGES as usize);
    let size = pages * PAGE_SIZE;
    // Working set: by default one message, reused (as ib_write_bw does); `--working-set` walks a
    // larger area round-robin (as a migration does), which costs more under TCG (cold TLB/cache).
    let ws = arg("--working-set", size as u64) as usize;
    let round_batches = arg("--round-batches", 0);
    let slots = (ws / size).max(1);
    let total_pages = slots * pages;
    let src = Arc::new(AnonMemory::new(total_pages * PAGE_SIZE, true).expect("mmap"));
    let mut buf = vec![0u8; PAGE_SIZE];
    for i in 0..total_pages {
        fill_page(&mut buf, PageKind::Random, 1, i as u64);
        src.write_from(i * PAGE_SIZE, &buf);
    }
    let dst = Arc::new(AnonMemory::new(total_pages * PAGE_SIZE, true).expect("mmap"));
    let (smap, dmap) = (src.map_at(0).unwrap(), dst.map_at(0).unwrap());
    let opts = RdmaOptions::from_env().expect("FERRY_RDMA_DEVICE");
    let psk = || Psk::new(b"rdma-bw-key-0123456789abcdefghijk".to_vec()).unwrap();
    let acc = RdmaAcceptor::bind(
        "127.0.0.1:0".parse().unwrap(),
        opts.clone(),
        ServerConfig {
            creds: psk().into(),
            caps: Caps::RDMA,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        },
    )
    .expect("bind");
    let addr = acc.local_addr().unwrap();
    let res = std::thread::scope(|sc| {
        let dmap = &dmap;
        let srv = sc.spawn(move || {
            let mut d = acc.accept(&|_| Ok(())).expect("accept").channel;
            let mut n = 0u64;
            loop {
                match d.rx.recv(dmap) {
                    Ok(Incoming::Batch(_)) => n += 1,
                    Ok(Incoming::Closed) => break,
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(e) => panic!("destination: {e}"),
                }
            }
            n
        });
        let cfg = ClientConfig {
            creds: psk().into(),
            binding: ChannelBinding { session: [7; 16], channel: 0 },
            caps: Caps::RDMA,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let mut s = rdma::connect(addr, &opts, cfg).expect("connect").channel;
        // Warm up: registration and the region table.
        let run = [PageRun { gpa: 0, pages: pages as u32 }];
        s.tx.send_batch(0, 0, BATCH_DEST_ZEROED, &run, &smap).expect("send");
        let t = Instant::now();
        let mut n = 0u64;
        let mut round = 0u32;
        while t.elapsed() < Duration::from_secs(seconds) {
            let slot = (n as usize + 1) % slots;
            let run = [PageRun { gpa: (slot * size) as u64, pages: pages as u32 }];
            s.tx.send_batch(n + 1, round, BATCH_DEST_ZEROED, &run, &smap).expect("send");
            n += 1;
            if round_batches > 0 && n.is_multiple_of(round_batches) {
                s.tx.end_round().expect("end of round");
                round += 1;
            }
        }
        s.tx.close().expect("close");
        let el = t.elapsed();
        let got = srv.join().expect("destination");
        assert_eq!(got, n + 1);
        (n, el)
    });
    let (n, el) = res;
    let bytes = n as f64 * size as f64;
    let gbps = bytes * 8.0 / el.as_secs_f64() / 1e9;
    let mibs = bytes / el.as_secs_f64() / (1 << 20) as f64;
    println!("{:<10} {:>10} {:>10} {:>12} {:>10}", "backend", "msg_bytes", "messages", "MiB/s", "Gb/s");
    println!("{:<10} {:>10} {:>10} {:>12.2} {:>10.3}", "rdma", size, n, mibs, gbps);
    println!(
        "{{\"bench\":\"rdma_bw\",\"msg_bytes\":{size},\"round_batches\":{round_batches},\"working_set\":{},\"messages\":{n},\"seconds\":{:.3},\"mib_s\":{mibs:.2},\"gbps\":{gbps:.4}}}",
        slots * size,
        el.as_secs_f64()
    );
}
