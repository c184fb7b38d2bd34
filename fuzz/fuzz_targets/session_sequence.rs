//! Arbitrary sequences of events against both migration sessions at once (`session::sim::Pair`):
//! control messages delivered, dropped, duplicated or reordered; batches and acknowledgements
//! delivered, duplicated or lost; channels lost and rejoined; the guest writing; time passing;
//! cancel; VM operations failing. After every step the ownership invariants must hold: never two
//! running copies, never a commit before a verified image (equal to the paused source's), never a
//! resume of the source after the destination committed, never a stale round's batch accepted.
#![no_main]
use ferry_migrate::session::sim::{Op, Pair};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let mut p = Pair::new(1 + usize::from(n % 3));
    for op in rest.chunks_exact(2) {
        p.step(Op::from_bytes(op[0], op[1]));
    }
    // Whatever happened, delivering the rest in order keeps them too.
    p.run_to_end(100);
    p.check();
});
