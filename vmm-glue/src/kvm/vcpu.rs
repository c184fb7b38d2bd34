//! The vCPU thread: runs KVM_RUN, serves the guest's ports, parks on pause.
//!
//! Pause protocol: the controller sets `want = Pause` and kicks the thread with a signal
//! (repeatedly, every 100 µs, so a kick that lands just before KVM_RUN is not lost) until the
//! thread reports `parked`. Before parking, the thread calls KVM_RUN once with `immediate_exit`
//! set: KVM then completes a pending port access (the guest's `OUT` that caused the last exit)
//! and returns at once, so that the registers read afterwards are consistent. A parked thread
//! holds no lock on the vCPU, so the controller can read or write its state. After `pause()`
//! returns, the guest does not run until `resume()`.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::block::{is_block_port, BlockDevice};
use super::guest::*;
use super::state::{DeviceState, MAX_ERROR_RECORDS};
use super::KvmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Quit,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    parked: bool,
    /// Why the vCPU thread stopped for good (fatal exit), if it did.
    dead: Option<String>,
}

/// State shared between the controller and the vCPU thread.
pub(crate) struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// The port device.
    pub device: Mutex<DeviceState>,
    /// The block device.
    pub block: Mutex<BlockDevice>,
    /// Throttle, percent of full speed (1..=100).
    pub throttle: AtomicU8,
    /// Exits served (all kinds).
    pub exits: std::sync::atomic::AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The signal used to kick the vCPU out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<i32> = OnceLock::new();
    let err = *INSTALLED.get_or_init(|| match vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
        Ok(()) => 0,
        Err(e) => e.errno(),
    });
    if err != 0 {
        return Err(KvmError::Thread(std::io::Error::from_raw_os_error(err)));
    }
    Ok(())
}

/// Owns the vCPU and its thread.
pub(crate) struct Runner {
    pub shared: Arc<Shared>,
    pub vcpu: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

impl Runner {
    pub fn new(vcpu: VcpuFd, block: BlockDevice) -> Result<Self, KvmError> {
        install_kick_handler()?;
        Ok(Self {
            shared: Arc::new(Shared {
                ctl: Mutex::new(Ctl { want: Want::Pause, parked: true, dead: None }),
                cv: Condvar::new(),
                device: Mutex::new(DeviceState::default()),
                block: Mutex::new(block),
                throttle: AtomicU8::new(100),
                exits: Default::default(),
            }),
            vcpu: Arc::new(Mutex::new(vcpu)),
            thread: None,
        })
    }

    /// Is the guest running (wanted to run, started, not dead)?
    pub fn is_running(&self) -> bool {
        let c = lock(&self.shared.ctl);
        self.thread.is_some() && c.want == Want::Run && c.dead.is_none()
    }

    /// Is the vCPU certainly outside KVM_RUN and staying there (never started, parked on a
    /// pause, or dead)? State may be read or written only then.
    pub fn is_stopped(&self) -> bool {
        let c = lock(&self.shared.ctl);
        self.thread.is_none() || c.dead.is_some() || (c.parked && c.want != Want::Run)
    }

    /// Why the vCPU stopped for good, if it did.
    pub fn dead(&self) -> Option<String> {
        lock(&self.shared.ctl).dead.clone()
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the thread is joined only in Drop, after which `thread` is None, so the
            // pthread_t is that of a live (or finished but not yet joined) thread. The signal has
            // a do-nothing handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Start (the first time) or let the vCPU run again.
    pub fn resume(&mut self) -> Result<(), KvmError> {
        {
            let mut c = lock(&self.shared.ctl);
            if let Some(d) = &c.dead {
                return Err(KvmError::VcpuDead(d.clone()));
            }
            c.want = Want::Run;
            self.shared.cv.notify_all();
        }
        if self.thread.is_none() {
            let shared = self.shared.clone();
            let vcpu = self.vcpu.clone();
            let t = std::thread::Builder::new()
                .name("ferry-vcpu0".into())
                .spawn(move || vcpu_loop(&shared, &vcpu))
                .map_err(KvmError::Thread)?;
            self.thread = Some(t);
        }
        Ok(())
    }

    /// Stop the vCPU; when this returns, it is parked outside KVM_RUN.
    pub fn pause(&mut self) -> Result<(), KvmError> {
        self.stop(Want::Pause)
    }

    fn stop(&mut self, want: Want) -> Result<(), KvmError> {
        let mut c = lock(&self.shared.ctl);
        c.want = want;
        self.shared.cv.notify_all();
        if self.thread.is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c.parked && c.dead.is_none() {
            self.kick();
            c = self.shared.cv.wait_timeout(c, Duration::from_micros(100)).unwrap_or_else(|e| e.into_inner()).0;
            if Instant::now() > deadline {
                return Err(KvmError::PauseTimeout);
            }
        }
        Ok(())
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop(Want::Quit);
            {
                let mut c = lock(&self.shared.ctl);
                c.want = Want::Quit;
                self.shared.cv.notify_all();
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The value of a port write (1, 2 or 4 bytes), zero-extended.
fn word(data: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    let n = data.len().min(4);
    w[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(w)
}

/// Serve a port write. Returns nothing: unknown ports are counted, not fatal.
fn port_out(dev: &mut DeviceState, port: u16, data: &[u8]) {
    let v = word(data);
    match port {
        PORT_COUNT_LO..=PORT_ERR_VAL_HI if port.is_multiple_of(4) => {
            dev.latch[usize::from((port - PORT_COUNT_LO) / 4)] = v;
            let pair = |lo: usize| u64::from(dev.latch[lo]) | (u64::from(dev.latch[lo + 1]) << 32);
            if port == PORT_SUM_HI {
                dev.passes = pair(0);
                dev.checksum = pair(2);
                dev.reports += 1;
            } else if port == PORT_ERR_VAL_HI {
                dev.errors += 1;
                if dev.error_records.len() < MAX_ERROR_RECORDS {
                    let rec = (pair(4), pair(6));
                    dev.error_records.push(rec);
                }
            }
        }
        _ => dev.unknown_port_writes += 1,
    }
}

fn vcpu_loop(shared: &Shared, vcpu: &Mutex<VcpuFd>) {
    let die = |why: String| {
        let mut c = lock(&shared.ctl);
        c.dead = Some(why);
        c.parked = true;
        shared.cv.notify_all();
    };
    loop {
        {
            let mut c = lock(&shared.ctl);
            c.parked = false;
            if c.want != Want::Run {
                drop(c);
                // Complete the access of the last exit so that saved registers are consistent.
                {
                    let mut v = lock(vcpu);
                    v.set_kvm_immediate_exit(1);
                    let r = v.run().map(|_| ());
                    v.set_kvm_immediate_exit(0);
                    if let Err(e) = r {
                        if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN {
                            drop(v);
                            die(format!("KVM_RUN (immediate exit): {e}"));
                            return;
                        }
                    }
                }
                c = lock(&shared.ctl);
                c.parked = true;
                shared.cv.notify_all();
                while c.want == Want::Pause {
                    c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                }
                if c.want == Want::Quit {
                    return;
                }
                c.parked = false;
            }
        }
        let t0 = Instant::now();
        let fatal = {
            let mut v = lock(vcpu);
            match v.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) if is_block_port(port) => {
                        lock(&shared.block).port_out(port, word(data));
                        None
                    }
                    VcpuExit::IoOut(port, data) => {
                        port_out(&mut lock(&shared.device), port, data);
                        None
                    }
                    VcpuExit::IoIn(port, data) => {
                        let v = if is_block_port(port) { lock(&shared.block).port_in(port) } else { 0 };
                        let b = v.to_le_bytes();
                        let n = data.len().min(4);
                        data.fill(0);
                        data[..n].copy_from_slice(&b[..n]);
                        None
                    }
                    VcpuExit::MmioRead(_, data) => {
                        data.fill(0);
                        None
                    }
                    VcpuExit::MmioWrite(..) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
                    VcpuExit::Hlt => Some("guest halted".to_string()),
                    VcpuExit::Shutdown => Some("guest shutdown (triple fault)".to_string()),
                    VcpuExit::FailEntry(reason, cpu) => Some(format!("entry failed: reason {reason:#x} on cpu {cpu}")),
                    VcpuExit::InternalError => Some("KVM internal error".to_string()),
                    other => Some(format!("unexpected exit {other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(format!("KVM_RUN: {e}")),
            }
        };
        shared.exits.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = fatal {
            die(why);
            return;
        }
        let p = u32::from(shared.throttle.load(Ordering::Relaxed).clamp(1, 100));
        if p < 100 {
            // Auto-converge: sleep so that the vCPU runs `p` percent of the time.
            let ran = t0.elapsed();
            let nap = (ran * (100 - p) / p).min(Duration::from_millis(100));
            let c = lock(&shared.ctl);
            let _ = shared.cv.wait_timeout_while(c, nap, |c| c.want == Want::Run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_latch_reports_and_errors() {
        let mut d = DeviceState::default();
        port_out(&mut d, PORT_COUNT_LO, &5u32.to_le_bytes());
        port_out(&mut d, PORT_COUNT_HI, &1u32.to_le_bytes());
        port_out(&mut d, PORT_SUM_LO, &7u32.to_le_bytes());
        assert_eq!(d.reports, 0);
        port_out(&mut d, PORT_SUM_HI, &0u32.to_le_bytes());
        assert_eq!((d.reports, d.passes, d.checksum), (1, (1 << 32) | 5, 7));
        for _ in 0..20 {
            port_out(&mut d, PORT_ERR_ADDR_LO, &0x1000u32.to_le_bytes());
            port_out(&mut d, PORT_ERR_ADDR_HI, &0u32.to_le_bytes());
            port_out(&mut d, PORT_ERR_VAL_LO, &3u32.to_le_bytes());
            port_out(&mut d, PORT_ERR_VAL_HI, &0u32.to_le_bytes());
        }
        assert_eq!(d.errors, 20);
        assert_eq!(d.error_records.len(), MAX_ERROR_RECORDS);
        assert_eq!(d.error_records[0], (0x1000, 3));
        port_out(&mut d, 0x80, &[1]);
        port_out(&mut d, PORT_COUNT_LO + 1, &[1]);
        assert_eq!(d.unknown_port_writes, 2);
    }
}
