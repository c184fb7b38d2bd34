//! Arbitrary sequences of frames against both handshake state machines: never a panic, and never
//! `Verified`/`Done` without the key.
#![no_main]
use std::time::{Duration, Instant};

use ferry_transport::handshake::*;
use ferry_transport::wire::FrameKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let psk = Psk::new(b"fuzzing-key-0123456789abcdefghijk".to_vec()).unwrap();
    let mut server = ServerHandshake::new(ServerConfig { creds: psk.clone().into(), caps: Caps::ALL, timeout: Duration::from_secs(5), encryption: Default::default() }, [1; 32], now);
    let binding = ChannelBinding { session: [2; 16], channel: 0 };
    let (mut client, _) = ClientHandshake::start(ClientConfig { creds: psk.into(), binding, caps: Caps::ALL, timeout: Duration::from_secs(5), encryption: Default::default() }, [3; 32], now);
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = FrameKind::from_u8(rest[0]);
        let len = (rest[1] as usize).min(rest.len() - 2);
        let payload = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let Ok(kind) = kind else { continue };
        // The fuzzer cannot know the key: neither side may finish.
        if let Ok(Step::Verified(_)) = server.handle_frame(kind, payload, now) {
            panic!("server verified a client without the key");
        }
        if let Ok(Step::Done(_)) = client.handle_frame(kind, payload, now) {
            panic!("client finished against a server without the key");
        }
    }
});
