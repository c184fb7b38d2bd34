//! Thin layer over `sideway`: open a device, create a reliable-connected queue pair, move it
//! through INIT/RTR/RTS, register memory, post work requests, poll completions. Every verbs
//! failure becomes a typed [`RdmaError`]; nothing here panics on what the device or the peer says.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use rdma_mummy_sys as sys;

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, PollCompletionQueueError};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState, SetScatterGatherEntry,
    WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use crate::error::RdmaError;

/// `error` and its sources, joined (sideway's errors say the cause in their sources).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn verbs(op: &'static str, e: &dyn std::error::Error) -> RdmaError {
    RdmaError::Verbs { op, detail: chain(e) }
}

/// Lock, ignoring poisoning: the protected values stay consistent across a panic in a test
/// thread (they are handles, not invariants spread over fields).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An opened device with its protection domain and the chosen port and GID.
pub(crate) struct Device {
    pub ctx: Arc<DeviceContext>,
    pub pd: Arc<ProtectionDomain>,
    pub port: u8,
    pub gid_index: u8,
    pub gid: [u8; 16],
    pub mtu: u32,
    pub max_qp_wr: u32,
}

fn is_v4_mapped(g: &[u8; 16]) -> bool {
    g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff
}

/// Open device `name`, port `port`; pick GID `gid_index`, or else the first IPv4-mapped GID
/// (RoCE v2 over IPv4), or else the first non-zero GID. An empty GID slot reads as zeros without
/// an error, so zero GIDs are refused explicitly.
pub(crate) fn open(name: &str, port: u8, gid_index: Option<u8>) -> Result<Device, RdmaError> {
    let list = DeviceList::new().map_err(|e| {
        RdmaError::NoDevice(format!("cannot list RDMA devices (is libibverbs installed?): {}", chain(&e)))
    })?;
    let mut names = Vec::new();
    let mut found = None;
    for d in list.iter() {
        let n = d.name();
        if n == name {
            found = Some(d.open().map_err(|e| verbs("ibv_open_device", &e))?);
            break;
        }
        names.push(n);
    }
    let ctx = found.ok_or_else(|| RdmaError::NoDevice(format!("no device named {name} (found: {names:?})")))?;
    let attr = ctx.query_device().map_err(|e| verbs("ibv_query_device", &e))?;
    let pattr = ctx.query_port(port).map_err(|e| verbs("ibv_query_port", &e))?;
    let mtu = pattr.active_mtu() as u32;
    let tbl = pattr.gid_tbl_len().clamp(0, 256) as u32;
    let (gid_index, gid) = match gid_index {
        Some(i) => {
            let g = ctx.query_gid(port, u32::from(i)).map_err(|e| verbs("ibv_query_gid", &e))?;
            if g.is_zero() {
                return Err(RdmaError::NoDevice(format!("{name} port {port} GID {i} is empty")));
            }
            (i, g.raw)
        }
        None => {
            let mut first = None;
            let mut mapped = None;
            for i in 0..tbl.min(32) {
                let Ok(g) = ctx.query_gid(port, i) else { continue };
                if g.is_zero() {
                    continue;
                }
                if first.is_none() {
                    first = Some((i as u8, g.raw));
                }
                if mapped.is_none() && is_v4_mapped(&g.raw) {
                    mapped = Some((i as u8, g.raw));
                }
            }
            mapped.or(first).ok_or_else(|| RdmaError::NoDevice(format!("{name} port {port} has no GID")))?
        }
    };
    let pd = ctx.alloc_pd().map_err(|e| verbs("ibv_alloc_pd", &e))?;
    let max_qp_wr = attr.max_qp_wr().max(1) as u32;
    Ok(Device { ctx, pd, port, gid_index, gid, mtu, max_qp_wr })
}

/// What a peer needs to connect to our queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QpInfo {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub mtu: u32,
    /// Receives posted for announcements: the sender's initial credit.
    pub recvs: u32,
}

impl QpInfo {
    pub const LEN: usize = 4 + 4 + 16 + 4 + 4;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..24].copy_from_slice(&self.gid);
        b[24..28].copy_from_slice(&self.mtu.to_le_bytes());
        b[28..32].copy_from_slice(&self.recvs.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, RdmaError> {
        if b.len() != Self::LEN {
            return Err(RdmaError::BadPeer("queue pair info has the wrong length"));
        }
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[8..24]);
        let info = Self { qpn: u(0), psn: u(4), gid, mtu: u(24), recvs: u(28) };
        if info.recvs == 0 || info.recvs > 1 << 16 {
            return Err(RdmaError::BadPeer("receive count out of range"));
        }
        if info.qpn == 0 || info.qpn > 0xff_ffff || info.psn > 0xff_ffff {
            return Err(RdmaError::BadPeer("queue pair number or PSN out of range"));
        }
        if gid.iter().all(|&x| x == 0) {
            return Err(RdmaError::BadPeer("zero GID"));
        }
        if !(1..=5).contains(&info.mtu) {
            return Err(RdmaError::BadPeer("unknown path MTU"));
        }
        Ok(info)
    }
}

fn mtu_of(v: u32) -> Mtu {
    match v {
        1 => Mtu::Mtu256,
        2 => Mtu::Mtu512,
        3 => Mtu::Mtu1024,
        4 => Mtu::Mtu2048,
        _ => Mtu::Mtu4096,
    }
}

/// The state of a queue pair ([`crate::rdma::QpStateQuery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// `IBV_QPS_RESET`.
    Reset,
    /// `IBV_QPS_INIT`.
    Init,
    /// `IBV_QPS_RTR`.
    ReadyToReceive,
    /// `IBV_QPS_RTS`.
    ReadyToSend,
    /// `IBV_QPS_SQD`.
    SendQueueDrain,
    /// `IBV_QPS_SQE`.
    SendQueueError,
    /// `IBV_QPS_ERR`: every work request is flushed, every incoming packet dropped.
    Error,
    /// A value the library does not know.
    Unknown,
}

/// A reliable-connected queue pair with its own send and receive completion queues.
pub(crate) struct Qp {
    pub qp: BasicQueuePair,
    pub psn: u32,
}

/// Completion queues of a [`Qp`] (shared: the send CQ is polled by the sending half, the receive
/// CQ by the receiving half).
pub(crate) struct Cqs {
    pub send: Arc<BasicCompletionQueue>,
    pub recv: Arc<BasicCompletionQueue>,
}

pub(crate) fn create_qp(dev: &Device, sq_depth: u32, rq_depth: u32) -> Result<(Qp, Cqs), RdmaError> {
    let send = dev.ctx.create_cq_builder().setup_cqe(sq_depth).build().map_err(|e| verbs("ibv_create_cq", &e))?;
    let recv = dev.ctx.create_cq_builder().setup_cqe(rq_depth).build().map_err(|e| verbs("ibv_create_cq", &e))?;
    let mut qp = dev
        .pd
        .create_qp_builder()
        .setup_send_cq(Arc::clone(&send))
        .setup_recv_cq(Arc::clone(&recv))
        .setup_max_send_wr(sq_depth)
        .setup_max_recv_wr(rq_depth)
        .setup_max_send_sge(1)
        .setup_max_recv_sge(1)
        .setup_max_inline_data(0)
        .build()
        .map_err(|e| verbs("ibv_create_qp", &e))?;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init)
        .setup_pkey_index(0)
        .setup_port(dev.port)
        .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
    qp.modify(&attr).map_err(|e| verbs("ibv_modify_qp(INIT)", &e))?;
    let psn = u32::from_le_bytes(crate::handshake::random_bytes::<4>()) & 0xff_ffff;
    Ok((Qp { qp, psn }, Cqs { send, recv }))
}

impl Qp {
    pub fn info(&self, dev: &Device, recvs: u32) -> QpInfo {
        QpInfo { qpn: self.qp.qp_number(), psn: self.psn, gid: dev.gid, mtu: dev.mtu, recvs }
    }

    /// INIT -> RTR -> RTS towards `peer`.
    pub fn connect(&mut self, dev: &Device, peer: &QpInfo) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu_of(dev.mtu.min(peer.mtu)))
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(peer.psn)
            .setup_max_dest_read_atomic(0)
            // 0.64 ms: how long a sender waits after a receiver-not-ready NAK.
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0).setup_port(dev.port).setup_service_level(0).setup_grh(
            &Gid { raw: peer.gid },
            0,
            dev.gid_index,
            64,
            0,
        );
        attr.setup_address_vector(&ah);
        self.qp.modify(&attr).map_err(|e| verbs("ibv_modify_qp(RTR)", &e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            // ~67 ms per transport retry, 7 retries: a dead peer is noticed in about half a second.
            .setup_timeout(14)
            .setup_retry_cnt(7)
            // Receiver not ready: cannot happen while the sender respects its credits; a few
            // retries, then an error (a broken peer must not hang the sender).
            .setup_rnr_retry(6)
            .setup_max_read_atomic(0);
        self.qp.modify(&attr).map_err(|e| verbs("ibv_modify_qp(RTS)", &e))?;
        Ok(())
    }

    /// Move the queue pair to the error state: outstanding and later work requests complete
    /// with a flush error. Used to cut a channel and to inject faults.
    pub fn set_error(&mut self) {
        let _ = self.enter_error_state();
    }

    /// [`Qp::set_error`], saying whether the device took it (`ibv_modify_qp` to `IBV_QPS_ERR`).
    /// In the error state the queue pair's responder drops every incoming packet: no RDMA WRITE
    /// lands through it any more, whatever rkey it names, and a window bound through it is dead.
    pub fn enter_error_state(&mut self) -> Result<(), RdmaError> {
        // SAFETY: ibv_qp_attr is plain data (integers and structs of them): all zeros is valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        let mask = sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as std::os::raw::c_int;
        // SAFETY: the queue pair is live while self is (we hold it mutably); `attr` lives on this
        // frame for the call, and the mask names only the state it sets.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.qp().as_ptr(), &mut attr, mask) };
        if rc != 0 {
            return Err(RdmaError::Verbs {
                op: "ibv_modify_qp(ERR)",
                detail: std::io::Error::from_raw_os_error(rc).to_string(),
            });
        }
        Ok(())
    }

    /// The queue pair's state as the device reports it now (`ibv_query_qp`, not the state
    /// libibverbs cached at the last modify).
    pub fn query_state(&self) -> Result<QpState, RdmaError> {
        // SAFETY: both structures are plain data (integers, structs of them, raw pointers): all
        // zeros is a valid value.
        let (mut attr, mut init): (sys::ibv_qp_attr, sys::ibv_qp_init_attr) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        let mask = sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as std::os::raw::c_int;
        // SAFETY: the queue pair is live while self is; both out-structures live on this frame.
        let rc = unsafe { sys::ibv_query_qp(self.qp.qp().as_ptr(), &mut attr, mask, &mut init) };
        if rc != 0 {
            return Err(RdmaError::Verbs {
                op: "ibv_query_qp",
                detail: std::io::Error::from_raw_os_error(rc).to_string(),
            });
        }
        use sys::ibv_qp_state as st;
        Ok(match attr.qp_state {
            st::IBV_QPS_RESET => QpState::Reset,
            st::IBV_QPS_INIT => QpState::Init,
            st::IBV_QPS_RTR => QpState::ReadyToReceive,
            st::IBV_QPS_RTS => QpState::ReadyToSend,
            st::IBV_QPS_SQD => QpState::SendQueueDrain,
            st::IBV_QPS_SQE => QpState::SendQueueError,
            st::IBV_QPS_ERR => QpState::Error,
            _ => QpState::Unknown,
        })
    }

    /// Post one receive of `len` bytes at `addr` (registered with `lkey`).
    ///
    /// # Safety
    /// `addr..addr+len` must lie in the memory region of `lkey` and stay mapped (and not be read
    /// as a Rust reference) until the receive completes or the queue pair is destroyed.
    pub unsafe fn post_recv(&mut self, wr_id: u64, lkey: u32, addr: u64, len: u32) -> Result<(), RdmaError> {
        let mut g = self.qp.start_post_recv();
        let h = g.construct_wr(wr_id);
        // SAFETY: forwarded to the caller's promise.
        unsafe { h.setup_sge(lkey, addr, len) };
        g.post().map_err(|e| verbs("ibv_post_recv", &e))
    }

    /// Post a chain of send work requests.
    ///
    /// # Safety
    /// Every local range must lie in the memory region of its lkey and stay mapped until the
    /// work request completes or the queue pair is destroyed; remote ranges are checked by the
    /// peer's device against its rkeys.
    pub unsafe fn post_send(&mut self, wrs: &[Wr]) -> Result<(), RdmaError> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut g = self.qp.start_post_send();
        for w in wrs {
            let flags = if w.signaled { WorkRequestFlags::Signaled } else { WorkRequestFlags::none() };
            let h = g.construct_wr(w.wr_id, flags);
            let h = match w.remote {
                Some((rkey, raddr)) => h.setup_write(rkey, raddr),
                None => h.setup_send(),
            };
            // SAFETY: forwarded to the caller's promise.
            unsafe { h.setup_sge(w.lkey, w.addr, w.len) };
        }
        g.post().map_err(|e| verbs("ibv_post_send", &e))
    }
}

/// One send-queue work request: an RDMA WRITE (`remote` set) or a SEND.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wr {
    pub wr_id: u64,
    pub signaled: bool,
    pub lkey: u32,
    pub addr: u64,
    pub len: u32,
    pub remote: Option<(u32, u64)>,
}

/// A completion, reduced to what the backend needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wc {
    pub wr_id: u64,
    pub byte_len: u32,
}

/// `IBV_WC_WR_FLUSH_ERR`: a work request flushed because its queue pair is in the error state.
pub(crate) const WC_WR_FLUSH_ERR: u32 = 5;

fn status_name(s: u32) -> &'static str {
    const NAMES: [&str; 23] = [
        "success",
        "local length error",
        "local QP operation error",
        "local EEC operation error",
        "local protection error",
        "work request flushed",
        "memory window bind error",
        "bad response",
        "local access error",
        "remote invalid request",
        "remote access error",
        "remote operation error",
        "transport retry counter exceeded",
        "RNR retry counter exceeded",
        "local RDD violation",
        "remote invalid RD request",
        "remote aborted",
        "invalid EE context number",
        "invalid EE context state",
        "fatal error",
        "response timeout",
        "general error",
        "tag matching error",
    ];
    NAMES.get(s as usize).copied().unwrap_or("unknown status")
}

/// Poll at most `max` completions from `cq` into `out`. A completion with an error status ends
/// the poll with [`RdmaError::WorkCompletion`].
pub(crate) fn poll(cq: &BasicCompletionQueue, out: &mut Vec<Wc>) -> Result<(), RdmaError> {
    let poller = match cq.start_poll() {
        Ok(p) => p,
        Err(PollCompletionQueueError::CompletionQueueEmpty) => return Ok(()),
        Err(e) => return Err(verbs("ibv_poll_cq", &e)),
    };
    for wc in poller {
        let status = wc.status();
        if status != 0 {
            return Err(RdmaError::WorkCompletion {
                wr_id: wc.wr_id(),
                status,
                name: status_name(status),
                vendor_err: wc.vendor_err(),
            });
        }
        out.push(Wc { wr_id: wc.wr_id(), byte_len: wc.byte_len() });
    }
    Ok(())
}

/// Register `len` bytes at `addr` with the device.
///
/// # Safety
/// `addr..addr+len` must be mapped memory that stays mapped while the region is registered (the
/// device pins the pages it maps, so an unmap after registration cannot make the device touch
/// other memory of this process, but the data would go astray). With `remote_write` the peer of
/// any queue pair in this protection domain that learns the rkey may write the range at any
/// time until deregistration: the caller must only hand out the rkey to an authenticated peer
/// and must not read the range through Rust references while writes may land.
pub(crate) unsafe fn register(
    pd: &Arc<ProtectionDomain>,
    addr: usize,
    len: usize,
    remote_write: bool,
) -> Result<Arc<MemoryRegion>, RdmaError> {
    let access =
        if remote_write { AccessFlags::LocalWrite | AccessFlags::RemoteWrite } else { AccessFlags::LocalWrite };
    // SAFETY: forwarded to the caller's promise.
    unsafe { pd.reg_mr(addr, len, access) }.map_err(|e| verbs("ibv_reg_mr", &e))
}

/// Register `len` bytes at `addr` for local writes and for binding memory windows: the region's
/// own rkey grants no remote access; the peer writes only through a window bound over it
/// ([`Mw`]), for as long as that window lives.
///
/// # Safety
/// As [`register`]; and every window bound over the region must be deallocated before the region
/// is dropped (a device refuses to deregister a region with windows bound to it).
pub(crate) unsafe fn register_for_windows(
    pd: &Arc<ProtectionDomain>,
    addr: usize,
    len: usize,
) -> Result<Arc<MemoryRegion>, RdmaError> {
    let access = AccessFlags::LocalWrite | AccessFlags::MemoryWindowBind;
    // SAFETY: forwarded to the caller's promise.
    unsafe { pd.reg_mr(addr, len, access) }.map_err(|e| verbs("ibv_reg_mr(MW_BIND)", &e))
}

/// A type-2 memory window: remote-write access to part of a region registered with
/// [`register_for_windows`], bound through one queue pair (the peer's writes through any other
/// queue pair are refused) and valid until the window is deallocated (dropped), when the device
/// refuses its rkey.
pub(crate) struct Mw {
    mw: NonNull<sys::ibv_mw>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: a window handle is a pointer to a verbs object that libibverbs lets any thread use; this
// type only reads its rkey, writes it (under `&mut self`) and deallocates it once, on drop.
unsafe impl Send for Mw {}
// SAFETY: as above; `&self` only reads the rkey.
unsafe impl Sync for Mw {}

impl Mw {
    /// Allocate an unbound type-2 window in `pd`.
    pub fn alloc(pd: &Arc<ProtectionDomain>) -> Result<Self, RdmaError> {
        // SAFETY: `pd` is a live protection domain (the Arc keeps it, and the window keeps the
        // Arc); the call returns a new window or null with errno set.
        let p = unsafe { sys::ibv_alloc_mw(pd.pd().as_ptr(), sys::ibv_mw_type::IBV_MW_TYPE_2) };
        let mw = NonNull::new(p).ok_or_else(|| RdmaError::Verbs {
            op: "ibv_alloc_mw(type 2)",
            detail: std::io::Error::last_os_error().to_string(),
        })?;
        Ok(Self { mw, _pd: Arc::clone(pd) })
    }

    /// The window's current rkey.
    pub fn rkey(&self) -> u32 {
        // SAFETY: the window is live until drop; the field is plain data.
        unsafe { (*self.mw.as_ptr()).rkey }
    }
}

impl Drop for Mw {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_mw and deallocated only here, once. Deallocating
        // invalidates a bound window: the device refuses its rkey from the return on.
        unsafe { sys::ibv_dealloc_mw(self.mw.as_ptr()) };
    }
}

/// The next rkey of a window (its key byte + 1), as `ibv_inc_rkey` computes it.
fn next_rkey(rkey: u32) -> u32 {
    (rkey & !0xff) | (rkey.wrapping_add(1) & 0xff)
}

impl Qp {
    /// Bind `mws[i]` over `ranges[i]` (address, length) of `mr` for remote writes, each with a new
    /// rkey, and wait (up to `timeout`) for every bind to complete on `send_cq`, which nothing
    /// else may poll meanwhile. On success each window's rkey is the new one.
    ///
    /// # Safety
    /// Every range must lie in `mr`; the peer of this queue pair may write it until the window is
    /// dropped, so the caller hands the rkeys only to the authenticated peer and must not read the
    /// ranges through Rust references while writes may land.
    pub unsafe fn bind_windows(
        qp: &Mutex<Qp>,
        send_cq: &BasicCompletionQueue,
        binds: &mut [(&mut Mw, &MemoryRegion, u64, u64)],
        timeout: std::time::Duration,
    ) -> Result<(), RdmaError> {
        if binds.is_empty() {
            return Ok(());
        }
        let n = binds.len();
        // SAFETY: ibv_send_wr is plain data (integers, raw pointers, unions of them): all zeros
        // is a valid value (null pointers, no scatter/gather entries).
        let mut wrs: Vec<sys::ibv_send_wr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut rkeys = Vec::with_capacity(n);
        for (i, (mw, mr, addr, len)) in binds.iter().enumerate() {
            let rkey = next_rkey(mw.rkey());
            rkeys.push(rkey);
            let w = &mut wrs[i];
            w.wr_id = BIND_WR_ID;
            w.opcode = sys::ibv_wr_opcode::IBV_WR_BIND_MW;
            w.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            w.bind_mw_tso_union.bind_mw = sys::bind_mw_t {
                mw: mw.mw.as_ptr(),
                rkey,
                bind_info: sys::ibv_mw_bind_info {
                    // SAFETY: reading the handle of a live region.
                    mr: unsafe { mr.mr() }.as_ptr(),
                    addr: *addr,
                    length: *len,
                    mw_access_flags: sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
                },
            };
        }
        for i in 0..n - 1 {
            let next: *mut sys::ibv_send_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        {
            let g = lock(qp);
            // SAFETY: the chain lives on this stack frame for the call (the provider copies the
            // requests into its queue); windows, region and queue pair are live; the ranges are
            // the caller's promise.
            let rc = unsafe { sys::ibv_post_send(g.qp.qp().as_ptr(), wrs.as_mut_ptr(), &mut bad) };
            if rc != 0 {
                return Err(RdmaError::Verbs {
                    op: "ibv_post_send(BIND_MW)",
                    detail: std::io::Error::from_raw_os_error(rc).to_string(),
                });
            }
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut done = 0;
        let mut wcs = Vec::new();
        while done < n {
            wcs.clear();
            poll(send_cq, &mut wcs)?;
            done += wcs.iter().filter(|w| w.wr_id == BIND_WR_ID).count();
            if done < n {
                if std::time::Instant::now() > deadline {
                    return Err(RdmaError::Verbs { op: "bind memory window", detail: "no completion in time".into() });
                }
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        for ((mw, ..), rkey) in binds.iter_mut().zip(rkeys) {
            // SAFETY: the window is live; the bind completed, so the device now knows it by
            // this rkey (a type-2 bind posted on a queue pair does not update the handle).
            unsafe { (*mw.mw.as_ptr()).rkey = rkey };
        }
        Ok(())
    }
}

/// The work request id of window binds (the destination's send queue carries nothing else).
const BIND_WR_ID: u64 = u64::MAX - 1;
