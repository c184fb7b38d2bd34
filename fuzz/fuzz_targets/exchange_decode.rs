//! Any bytes into the interface-exchange decoder: never a panic; what decodes round-trips.
#![no_main]
use ferry_multichannel::codec::ExchangeMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ExchangeMsg::decode(data) {
        let b = m.encode().expect("a decoded message is within the caps");
        assert_eq!(ExchangeMsg::decode(&b).unwrap(), m);
    }
});
