//! `ferry-ifaces`: the interfaces Ferry sees on this host (or in this network namespace).
//!
//! ```text
//! ferry-ifaces          a table
//! ferry-ifaces --hex    the list in the exchange's wire encoding, hex (for tests and tools)
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let hex = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--hex") => true,
        Some(a) => {
            eprintln!("ferry-ifaces: unknown argument {a:?} (usage: ferry-ifaces [--hex])");
            return ExitCode::from(2);
        }
    };
    let list = match ferry_multichannel::discover() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry-ifaces: {e}");
            return ExitCode::FAILURE;
        }
    };
    if hex {
        match ferry_multichannel::codec::encode_list(&list) {
            Ok(b) => println!("{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
            Err(e) => {
                eprintln!("ferry-ifaces: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!("{:<16} {:<5} {:<4} {:>8} {:>6} {:<4} addresses", "name", "state", "kind", "Mbit/s", "mtu", "rdma");
    for i in &list {
        let state = if i.usable() {
            "up"
        } else if i.up {
            "nocarrier"
        } else {
            "down"
        };
        let addrs: Vec<String> = i.addrs.iter().map(|a| a.to_string()).collect();
        println!(
            "{:<16} {:<5} {:<4} {:>8} {:>6} {:<4} {}",
            i.name,
            state,
            if i.loopback { "lo" } else { "" },
            i.speed_mbps.map_or("-".into(), |s| s.to_string()),
            i.mtu.map_or("-".into(), |m| m.to_string()),
            if i.rdma { "yes" } else { "" },
            addrs.join(" ")
        );
    }
    ExitCode::SUCCESS
}
