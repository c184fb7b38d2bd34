//! Arbitrary sequences of events against both migration sessions at once (`session::sim::Pair`):
//! control messages delivered, dropped, duplicated or reordered; batches and acknowledgements
//! delivered, duplicated or lost; channels lost and rejoined; the guest writing; time passing;
//! cancel; VM operations failing. After every step the ownership invariants must hold: never two
//! running copies, never a commit before a verified image (equal to the paused source's), never a
//! resume of the source after the destination committed, never a stale round's batch accepted;
//! with a disk, never a source file removed before the destination runs the VM, never a disk
//! named at the destination without a verified, committed image equal to the paused source's.
#![no_main]
use ferry_migrate::session::sim::{Op, Pair};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    // Bits 2-3 of the first byte: a VM with a disk (shared-nothing), its source file kept or not.
    let channels = 1 + usize::from(n % 3);
    let mut p = match (n >> 2) % 3 {
        0 => Pair::new(channels),
        k => Pair::with_disks(channels, k == 2),
    };
    for op in rest.chunks_exact(2) {
        p.step(Op::from_bytes(op[0], op[1]));
    }
    // Whatever happened, delivering the rest in order keeps them too.
    p.run_to_end(100);
    p.check();
});
