//! Any bytes into the migration control decoder: never a panic; what decodes round-trips.
#![no_main]
use ferry_migrate::protocol::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Msg::decode(data) {
        assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
    }
});
