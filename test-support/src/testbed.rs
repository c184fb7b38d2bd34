//! Network namespaces joined by rate-limited veth pairs: the one Rust handle on
//! `scripts/testbed.sh`, for tests (multichannel, perf) and for `migration-bench --testbed`.
//!
//! The script is compiled into the binary (and run with `bash -c`), so `migration-bench` works
//! from any directory. Tests take a testbed with [`testbed_or_skip`], which prints
//! `SKIP: <test>: <reason>` where namespaces cannot be made. A [`Testbed`] removes its namespaces when dropped, and
//! [`install_interrupt_cleanup`] makes Ctrl-C (SIGINT, SIGTERM, SIGHUP) remove every live testbed
//! and kill the benchmark's children before the process exits.
//!
//! Addressing: NIC `i` (0-based) is interface `nic<i>` in both namespaces, `198.18.<i>.1` on the
//! source side and `198.18.<i>.2` on the destination side (/24 each, inside 198.18.0.0/15).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Why a testbed could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// Invalid request (NIC count, NIC index).
    #[error("{0}")]
    Usage(String),
    /// The script or a command it runs failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// What was run.
        what: String,
        /// Exit status and what it printed on stderr.
        detail: String,
    },
    /// Operating system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TestbedError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// Result of the testbed.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// The testbed script, as shipped in `scripts/testbed.sh`.
pub const SCRIPT: &str = include_str!("../../scripts/testbed.sh");

/// Most NICs a testbed may have (the script's limit).
pub const MAX_NICS: u32 = 64;

/// Which host of the testbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source host (`<name>-src`).
    Src,
    /// The destination host (`<name>-dst`).
    Dst,
}

/// A command that runs `program` in network namespace `ns` (`ip netns exec`), or here for `None`.
/// `ip netns exec` replaces itself with the program, so the child's pid is the program's.
pub fn in_netns(ns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Run the testbed script with `args`; its stdout on success.
pub fn run_script(args: &[&str]) -> Result<String> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .arg("testbed.sh")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestbedError::io("running bash for scripts/testbed.sh", e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestbedError::Command {
            what: format!("testbed.sh {}", args.join(" ")),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// A testbed name no other run of this machine uses at the same time (`<prefix><pid><n>`, hex).
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut s = format!("{prefix}{:x}{n:x}", std::process::id());
    s.truncate(12);
    s
}

/// Can this process create network namespaces? `Err(reason)` if not (tests print `SKIP: reason`).
pub fn check_permitted() -> std::result::Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root: network namespaces and tc need root".into());
    }
    let probe = unique_name("fbprobe");
    let add = Command::new("ip").args(["netns", "add", &probe]).stderr(Stdio::piped()).output();
    match add {
        Err(e) => Err(format!("cannot run ip: {e}")),
        Ok(o) if !o.status.success() => {
            Err(format!("ip netns add is not permitted: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            match Command::new("tc").arg("-V").stdout(Stdio::null()).status() {
                Ok(s) if s.success() => Ok(()),
                _ => Err("tc is not available".into()),
            }
        }
    }
}

/// Move the calling thread into network namespace `ns` (`/run/netns/<ns>`).
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|e| TestbedError::io(format!("opening {path}"), e))?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| TestbedError::io(format!("setns {path}"), e.into()))
}

/// For tests: a testbed of `nics` unlimited links, or `None` after writing
/// `SKIP: <test>: <reason>` to the process's stderr (not through `eprintln!`, which the test
/// harness captures) where this machine cannot make one.
pub fn testbed_or_skip(test: &str, nics: u32) -> Option<Testbed> {
    let r = check_permitted()
        .and_then(|()| Testbed::up(&unique_name("tb"), &vec!["none"; nics as usize]).map_err(|e| e.to_string()));
    match r {
        Ok(tb) => Some(tb),
        Err(why) => {
            crate::skip(test, &why);
            None
        }
    }
}

static ACTIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Remember a child process to kill on Ctrl-C.
pub fn register_child(pid: u32) {
    if let (Ok(mut c), Ok(pid)) = (CHILDREN.lock(), i32::try_from(pid)) {
        c.push(pid);
    }
}

/// Forget a child (it has been waited for).
pub fn unregister_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain(|&p| i64::from(p) != i64::from(pid));
    }
}

/// On SIGINT, SIGTERM or SIGHUP: kill the registered children, remove every live testbed, exit 130.
pub fn install_interrupt_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let r = ctrlc::set_handler(|| {
            if let Ok(c) = CHILDREN.lock() {
                for &pid in c.iter() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let names: Vec<String> = ACTIVE.lock().map(|a| a.clone()).unwrap_or_default();
            for n in names {
                eprintln!("interrupted; removing testbed {n}");
                let _ = run_script(&["down", "--name", &n]);
            }
            std::process::exit(130);
        });
        if let Err(e) = r {
            eprintln!("cannot install the testbed Ctrl-C cleanup: {e}");
        }
    });
}

/// A live testbed; removed on drop.
#[derive(Debug)]
pub struct Testbed {
    name: String,
    rates: Vec<String>,
    live: bool,
}

impl Testbed {
    /// Create namespaces `<name>-src` and `<name>-dst` joined by one veth pair per rate (tc-style
    /// bit rates such as `500mbit`, or `none` for no limit).
    pub fn up<R: std::fmt::Display>(name: &str, rates: &[R]) -> Result<Testbed> {
        if rates.is_empty() || rates.len() > MAX_NICS as usize {
            return Err(TestbedError::Usage(format!("a testbed has 1..={MAX_NICS} NICs, not {}", rates.len())));
        }
        let list: Vec<String> = rates.iter().map(R::to_string).collect();
        // Registered first, so that Ctrl-C during `up` cleans up too (`down` is idempotent).
        if let Ok(mut a) = ACTIVE.lock() {
            a.push(name.to_string());
        }
        let tb = Testbed { name: name.to_string(), rates: list.clone(), live: true };
        run_script(&["up", "--name", name, "--nics", &rates.len().to_string(), "--rate", &list.join(",")])?;
        Ok(tb)
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of NICs.
    pub fn nics(&self) -> u32 {
        self.rates.len() as u32
    }

    /// Current rate of each NIC, as given to the script.
    pub fn rates(&self) -> &[String] {
        &self.rates
    }

    /// Namespace of one side.
    pub fn netns(&self, side: Side) -> String {
        match side {
            Side::Src => format!("{}-src", self.name),
            Side::Dst => format!("{}-dst", self.name),
        }
    }

    /// Address of `side` on NIC `nic`.
    pub fn addr(side: Side, nic: u32) -> Ipv4Addr {
        let host = match side {
            Side::Src => 1,
            Side::Dst => 2,
        };
        Ipv4Addr::new(198, 18, nic.min(255) as u8, host)
    }

    /// A command running `program` on one side.
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        in_netns(Some(&self.netns(side)), program)
    }

    fn check_nic(&self, nic: u32) -> Result<()> {
        if nic >= self.nics() {
            return Err(TestbedError::Usage(format!("testbed {} has no nic{nic}", self.name)));
        }
        Ok(())
    }

    /// Change the rate of one NIC (both directions).
    pub fn set_rate(&mut self, nic: u32, rate: impl std::fmt::Display) -> Result<()> {
        self.check_nic(nic)?;
        let rate = rate.to_string();
        run_script(&["set-rate", "--name", &self.name, "--nic", &nic.to_string(), "--rate", &rate])?;
        self.rates[nic as usize] = rate;
        Ok(())
    }

    /// Take one NIC down (both ends).
    pub fn link_down(&self, nic: u32) -> Result<()> {
        self.check_nic(nic)?;
        run_script(&["link-down", "--name", &self.name, "--nic", &nic.to_string()]).map(drop)
    }

    /// Bring one NIC back up.
    pub fn link_up(&self, nic: u32) -> Result<()> {
        self.check_nic(nic)?;
        run_script(&["link-up", "--name", &self.name, "--nic", &nic.to_string()]).map(drop)
    }

    /// Move the calling thread into one side's network namespace (sockets it opens afterwards
    /// live there). Meant for tests and in-process probes; use a thread of its own.
    pub fn enter_thread(&self, side: Side) -> Result<()> {
        enter_netns(&self.netns(side))
    }

    /// Remove the testbed now, reporting failure.
    pub fn down(mut self) -> Result<()> {
        self.live = false;
        let r = run_script(&["down", "--name", &self.name]).map(drop);
        if let Ok(mut a) = ACTIVE.lock() {
            a.retain(|n| n != &self.name);
        }
        r
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.live {
            if let Err(e) = run_script(&["down", "--name", &self.name]) {
                eprintln!("removing testbed {}: {e}", self.name);
            }
            if let Ok(mut a) = ACTIVE.lock() {
                a.retain(|n| n != &self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let a = unique_name("fb");
        let b = unique_name("fb");
        assert_ne!(a, b);
        assert!(a.len() <= 12 && a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(Testbed::addr(Side::Src, 3), Ipv4Addr::new(198, 18, 3, 1));
        assert_eq!(Testbed::addr(Side::Dst, 0), Ipv4Addr::new(198, 18, 0, 2));
    }
}
