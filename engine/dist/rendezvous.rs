//! Rendezvous over plain TCP (std only): rank 0 listens on `MASTER_ADDR:MASTER_PORT`, the other ranks connect with
//! backoff, rank 0 checks every rank's handshake and hands out an opaque 128-byte blob (the NCCL unique id), and the
//! connections stay open as a small host [`Store`] in a star around rank 0: [`Store::barrier`],
//! [`Store::all_gather_bytes`] and [`Store::all_reduce_f64_sum`] (summed in rank order on rank 0 and broadcast, so
//! every rank gets the same bits).
//!
//! Every wait has a timeout, and a rank whose connection closes (its process exited or crashed) makes the others
//! fail with an error naming it. Rank 0 tells the other ranks why it failed, so every rank exits with the same
//! message.
//!
//! # Wire format (all integers little-endian)
//!
//! Hello, each rank > 0 to rank 0 once connected (the fields are frozen: a later protocol version only appends after
//! the hostname, so any version can read and name a rank of any other):
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | magic `ZCRV` |
//! | 4 | protocol version (u32, [`PROTOCOL_VERSION`]) |
//! | 4 | world size (u32) |
//! | 4 | rank (u32) |
//! | 4 | local rank (u32) |
//! | 8 | graph hash (u64) |
//! | 2 + n | hostname: length n (u16, at most 255) and UTF-8 bytes |
//!
//! Reply, rank 0 to each rank: magic `ZCRV`, rank 0's protocol version (u32), a status byte, then
//! - status 1 (refused): message length (u32) and the UTF-8 message, the same text rank 0 fails with;
//! - status 0 (accepted): world size (u32), the 128-byte blob, and for every rank in order its local rank (u32) and
//!   hostname (u16 length, bytes).
//!
//! A connection whose first bytes are not a hello (no magic, or nothing within a few seconds) is dropped and the
//! wait goes on: a port scanner or a health check does not end the job.
//!
//! Store frames, both ways after the handshake: op (u8: 1 barrier, 2 all-gather, 3 f64 sum, 0xEE error), collective
//! sequence number (u64, from 1), payload length (u64) and payload. A rank > 0 sends its contribution; rank 0
//! answers with the result under the same op and number: nothing for a barrier; for an all-gather the count (u32)
//! then each rank's length (u64) and bytes; for a sum the f64 values. An error frame carries rank 0's message.

use super::env::DistEnv;
use crate::error::{Error, Result};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The first four bytes of every handshake message.
pub const MAGIC: [u8; 4] = *b"ZCRV";
/// Version of the handshake and store protocol; ranks of different versions are refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Size of the blob rank 0 hands out (an `ncclUniqueId`).
pub const BLOB_LEN: usize = 128;

const MAX_HOSTNAME: usize = 255;
/// How long rank 0 waits for a fresh connection's hello before dropping it as not a zeroconv rank.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than rank 0 the other ranks wait, so rank 0 times out first and tells them who was missing.
const GRACE: Duration = Duration::from_secs(2);
/// Largest store payload accepted (a sanity bound against a corrupt length).
const MAX_PAYLOAD: u64 = 1 << 36;

const OP_BARRIER: u8 = 1;
const OP_GATHER: u8 = 2;
const OP_SUM_F64: u8 = 3;
const OP_ERROR: u8 = 0xEE;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_BARRIER => "barrier",
        OP_GATHER => "all_gather_bytes",
        OP_SUM_F64 => "all_reduce_f64_sum",
        OP_ERROR => "error",
        _ => "an unknown operation",
    }
}

/// What a rank says about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// This machine's name, for messages (at most 255 bytes are sent).
    pub hostname: String,
    /// A hash of the compiled training step: every rank must have compiled the same one.
    pub graph_hash: u64,
}

impl Hello {
    /// This process's hello under `env`, with this machine's [`hostname`].
    pub fn from_env(env: &DistEnv, graph_hash: u64) -> Hello {
        Hello {
            rank: env.rank,
            world_size: env.world_size,
            local_rank: env.local_rank,
            hostname: hostname(),
            graph_hash,
        }
    }
}

/// The timeouts of a rendezvous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How long rank 0 waits for every rank to arrive, and each other rank tries to reach rank 0 (default 300 s).
    pub join: Duration,
    /// How long rank 0 waits for every rank to enter a collective (default 600 s); the others wait a little longer
    /// so rank 0 can tell them which rank was missing.
    pub collective: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts { join: Duration::from_secs(300), collective: Duration::from_secs(600) }
    }
}

/// One rank of the job as rank 0 saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub rank: usize,
    pub local_rank: usize,
    pub hostname: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} (host {}, local rank {})", self.rank, self.hostname, self.local_rank)
    }
}

/// The outcome of a rendezvous: this rank's place, rank 0's blob, every rank's host, and the store.
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Rank 0's blob (the NCCL unique id), the same on every rank.
    pub blob: [u8; BLOB_LEN],
    /// Every rank, in rank order.
    pub members: Vec<Member>,
    pub store: Store,
}

impl fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`, `/etc/hostname`, `$HOSTNAME`), or `unknown-host`.
pub fn hostname() -> String {
    let from_file = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let name = from_file("/proc/sys/kernel/hostname")
        .filter(|s| !s.is_empty())
        .or_else(|| from_file("/etc/hostname").filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".into());
    truncate_hostname(&name)
}

fn truncate_hostname(name: &str) -> String {
    let mut end = name.len().min(MAX_HOSTNAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// `rank 2` or `ranks 2, 3`.
fn ranks_text(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    format!("{} {}", if ranks.len() == 1 { "rank" } else { "ranks" }, list.join(", "))
}

/// `now + d`, with `d` capped at a year (so `Duration::MAX` means "no timeout" without overflowing).
fn after(d: Duration) -> Instant {
    Instant::now() + d.min(Duration::from_secs(365 * 24 * 3600))
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl Rendezvous {
    /// A world of one: no network; the store's collectives return this rank's own values.
    pub fn single(me: &Hello, blob: &[u8; BLOB_LEN]) -> Result<Rendezvous> {
        if me.world_size != 1 || me.rank != 0 {
            return Err(Error::msg(format!(
                "a single-process rendezvous needs rank 0 of world 1, not rank {} of world {}",
                me.rank, me.world_size
            )));
        }
        let members = vec![Member { rank: 0, local_rank: me.local_rank, hostname: truncate_hostname(&me.hostname) }];
        let store = Store::new(0, 1, members.clone(), Duration::MAX, Link::Alone);
        Ok(Rendezvous { rank: 0, world_size: 1, blob: *blob, members, store })
    }

    /// The rendezvous of this process under `env`: alone for a world of one; rank 0 listens on `MASTER_PORT` (on
    /// `MASTER_ADDR` when it is a loopback address, else on every interface, like torchrun's store) and calls
    /// `make_blob` for the blob; the others connect to `MASTER_ADDR:MASTER_PORT`.
    pub fn join(
        env: &DistEnv,
        graph_hash: u64,
        timeouts: Timeouts,
        make_blob: impl FnOnce() -> Result<[u8; BLOB_LEN]>,
    ) -> Result<Rendezvous> {
        let me = Hello::from_env(env, graph_hash);
        if env.world_size == 1 {
            return Rendezvous::single(&me, &make_blob()?);
        }
        if env.rank != 0 {
            return Rendezvous::connect(&env.master(), &me, timeouts);
        }
        let resolved = env.master().to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| {
            Error::msg(format!("MASTER_ADDR={}: cannot resolve this address on rank 0", env.master_addr))
        })?;
        let ip = match resolved.ip() {
            ip if ip.is_loopback() => ip,
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let listener = RendezvousListener::bind(SocketAddr::new(ip, env.master_port))?;
        listener.serve(&me, &make_blob()?, timeouts)
    }

    /// Rank > 0: connects to rank 0 at `master` (`host:port`) with backoff for up to `timeouts.join`, sends the
    /// hello and waits for rank 0's answer.
    pub fn connect(master: &str, me: &Hello, timeouts: Timeouts) -> Result<Rendezvous> {
        let who = format!("rank {} (host {})", me.rank, me.hostname);
        if me.rank == 0 || me.rank >= me.world_size {
            return Err(Error::msg(format!(
                "{who}: only ranks 1 to {} connect to rank 0 (world size {})",
                me.world_size.saturating_sub(1),
                me.world_size
            )));
        }
        let deadline = after(timeouts.join);
        let mut backoff = Duration::from_millis(20);
        let mut stream = loop {
            let attempt = match master.to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
                    let mut found = None;
                    for addr in addrs {
                        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
                            Ok(s) => {
                                found = Some(s);
                                break;
                            }
                            Err(e) => last = e,
                        }
                    }
                    found.ok_or(last)
                }
                Err(e) => Err(e),
            };
            match attempt {
                Ok(s) => break s,
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::msg(format!(
                            "{who}: could not reach rank 0 at {master} within {} (last error: {e}); is rank 0 \
                             running, and do all ranks use the same MASTER_ADDR and MASTER_PORT?",
                            secs(timeouts.join)
                        )));
                    }
                    std::thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        let _ = stream.set_nodelay(true);
        // Rank 0 started listening before this connection, so its join deadline comes before this one.
        let deadline = after(timeouts.join.saturating_add(GRACE));
        let lost = |e: io::Error| -> Error {
            if is_closed(&e) {
                Error::msg(format!(
                    "{who}: rank 0 at {master} closed the connection during the rendezvous without a reason (it \
                     failed or exited just as this rank connected, and its log says why; or it is not a zeroconv \
                     rank)"
                ))
            } else if is_timeout(&e) {
                Error::msg(format!(
                    "{who}: rank 0 at {master} did not complete the rendezvous within {}",
                    secs(timeouts.join.saturating_add(GRACE))
                ))
            } else {
                Error::msg(format!("{who}: the rendezvous connection to rank 0 at {master} failed: {e}"))
            }
        };
        write_by(&mut stream, &encode_hello(me)?, deadline).map_err(lost)?;
        let mut head = [0u8; 9];
        read_by(&mut stream, &mut head, deadline).map_err(lost)?;
        if head[..4] != MAGIC {
            return Err(Error::msg(format!(
                "{who}: {master} answered with something that is not a zeroconv rendezvous (another service on \
                 MASTER_PORT?)"
            )));
        }
        let mut r = Reader { stream: &mut stream, deadline };
        match head[8] {
            1 => {
                let len = r.u32().map_err(lost)? as usize;
                let msg = r.bytes(len.min(1 << 20)).map_err(lost)?;
                Err(Error::msg(String::from_utf8_lossy(&msg).into_owned()))
            }
            0 => {
                let world = r.u32().map_err(lost)? as usize;
                if world != me.world_size {
                    return Err(Error::msg(format!(
                        "{who}: rank 0 accepted a world size of {world}, this rank has {}",
                        me.world_size
                    )));
                }
                let mut blob = [0u8; BLOB_LEN];
                r.fill(&mut blob).map_err(lost)?;
                let mut members = Vec::with_capacity(world);
                for rank in 0..world {
                    let local_rank = r.u32().map_err(lost)? as usize;
                    let len = r.u16().map_err(lost)? as usize;
                    let hostname = String::from_utf8_lossy(&r.bytes(len).map_err(lost)?).into_owned();
                    members.push(Member { rank, local_rank, hostname });
                }
                let store = Store::new(me.rank, world, members.clone(), timeouts.collective, Link::Leaf(stream));
                Ok(Rendezvous { rank: me.rank, world_size: world, blob, members, store })
            }
            s => Err(Error::msg(format!("{who}: rank 0 at {master} sent an unknown handshake status {s}"))),
        }
    }
}

/// Rank 0's listening socket, bound before the rendezvous (tests bind port 0 and hand the real port to the others).
pub struct RendezvousListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RendezvousListener {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr) -> Result<RendezvousListener> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            Error::msg(format!(
                "rank 0 could not listen on {addr} (MASTER_PORT={}): {e}; if another job on this node uses the \
                 port, choose another MASTER_PORT",
                addr.port()
            ))
        })?;
        let addr = listener.local_addr().map_err(|e| Error::msg(format!("rank 0 listening socket: {e}")))?;
        Ok(RendezvousListener { listener, addr })
    }

    /// The address actually bound (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Rank 0: waits up to `timeouts.join` for ranks 1..world to arrive, checks each hello against `me`, then sends
    /// everyone `blob` and every rank's host. A refused rank is told why, and so is every rank already connected;
    /// rank 0 fails with the same message.
    pub fn serve(self, me: &Hello, blob: &[u8; BLOB_LEN], timeouts: Timeouts) -> Result<Rendezvous> {
        if me.rank != 0 {
            return Err(Error::msg(format!("only rank 0 serves the rendezvous, not rank {}", me.rank)));
        }
        let world = me.world_size;
        if world == 0 || u32::try_from(world).is_err() {
            return Err(Error::msg(format!("world size {world} is out of range")));
        }
        let me_member = Member { rank: 0, local_rank: me.local_rank, hostname: truncate_hostname(&me.hostname) };
        if world == 1 {
            return Rendezvous::single(me, blob);
        }
        let deadline = after(timeouts.join);
        let mut peers: Vec<Option<(TcpStream, Member)>> = (0..world).map(|_| None).collect();
        let mut joined = 1;
        let mut strays = 0usize;
        self.listener.set_nonblocking(true).map_err(|e| Error::msg(format!("rank 0 listening socket: {e}")))?;

        // Fails the rendezvous: tells `offender` (a refused connection) and every joined rank why.
        // Fails the rendezvous: tells `offender` (a refused connection), every joined rank and every connection
        // already waiting in the listen backlog why (ranks that connect later find nobody listening).
        let listener = &self.listener;
        let fail = |peers: &mut Vec<Option<(TcpStream, Member)>>, offender: Option<TcpStream>, msg: String| {
            let reject = encode_reject(&msg);
            let until = Instant::now() + Duration::from_secs(1);
            let mut pending = Vec::new();
            while let Ok((mut s, _)) = listener.accept() {
                // Read the hello first: closing on unread data would reset the connection before the reply arrives.
                if s.set_nonblocking(false).is_ok() && matches!(read_hello(&mut s, until), Ok(Some(_))) {
                    pending.push(s);
                }
            }
            let joined = peers.iter_mut().filter_map(|p| p.take()).map(|(s, _)| s);
            for mut s in offender.into_iter().chain(joined).chain(pending) {
                let _ = write_by(&mut s, &reject, until);
                let _ = s.shutdown(Shutdown::Write);
            }
            Error::msg(msg)
        };

        while joined < world {
            if let Some((_, m)) = peers.iter().flatten().find(|(s, _)| peer_closed(s)) {
                let msg = format!(
                    "rendezvous: {m} closed its connection while rank 0 waited for the other ranks (the process \
                     exited or crashed)"
                );
                return Err(fail(&mut peers, None, msg));
            }
            let (mut stream, from) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (1..world).filter(|&r| peers[r].is_none()).collect();
                        let mut arrived = vec![me_member.to_string()];
                        arrived.extend(peers.iter().flatten().map(|(_, m)| m.to_string()));
                        let strays = if strays > 0 {
                            format!("; {strays} connection(s) that were not zeroconv ranks were dropped")
                        } else {
                            String::new()
                        };
                        let msg = format!(
                            "rendezvous timed out after {}: {} of world size {world} never arrived (arrived: {}{strays}); \
                             check that every rank was launched with the same MASTER_ADDR and MASTER_PORT={}",
                            secs(timeouts.join),
                            ranks_text(&missing),
                            arrived.join(", "),
                            self.addr.port()
                        );
                        return Err(fail(&mut peers, None, msg));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    let msg = format!("rank 0 could not accept connections on {}: {e}", self.addr);
                    return Err(fail(&mut peers, None, msg));
                }
            };
            let hello_deadline = Instant::now() + HELLO_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            if stream.set_nonblocking(false).is_err() {
                strays += 1;
                continue;
            }
            let _ = stream.set_nodelay(true);
            let h = match read_hello(&mut stream, hello_deadline) {
                Ok(Some(h)) => h,
                Ok(None) | Err(_) => {
                    strays += 1;
                    continue;
                }
            };
            let who = Member { rank: h.rank, local_rank: h.local_rank, hostname: h.hostname.clone() };
            let refusal = if h.version != PROTOCOL_VERSION {
                Some(format!(
                    "rendezvous refused {who} from {from}: protocol version {} but rank 0 (host {}) speaks version \
                     {PROTOCOL_VERSION}; every rank must run the same zeroconv build",
                    h.version, me_member.hostname
                ))
            } else if h.world_size != world {
                Some(format!(
                    "rendezvous refused {who}: world size {} but rank 0 (host {}) has world size {world}; every rank \
                     must be launched with the same WORLD_SIZE",
                    h.world_size, me_member.hostname
                ))
            } else if h.rank == 0 {
                Some(format!(
                    "rendezvous refused a second rank 0 ({who} from {from}): rank 0 is already {me_member}; every \
                     process needs its own RANK"
                ))
            } else if h.rank >= world {
                Some(format!("rendezvous refused {who}: rank {} is not below the world size {world}", h.rank))
            } else if let Some((_, first)) = &peers[h.rank] {
                Some(format!(
                    "rendezvous refused a duplicate rank {}: {first} already joined, and {who} from {from} claims the \
                     same rank; every process needs its own RANK",
                    h.rank
                ))
            } else if h.graph_hash != me.graph_hash {
                Some(format!(
                    "rendezvous refused {who}: it compiled a different training step (graph hash {:#018x}) than rank \
                     0 (host {}, graph hash {:#018x}); every rank must run the same zeroconv build with the same \
                     config",
                    h.graph_hash, me_member.hostname, me.graph_hash
                ))
            } else {
                None
            };
            if let Some(msg) = refusal {
                return Err(fail(&mut peers, Some(stream), msg));
            }
            peers[h.rank] = Some((stream, who));
            joined += 1;
        }

        // Everyone is here: hand out the blob and the members.
        let mut members = vec![me_member];
        let mut streams = Vec::with_capacity(world - 1);
        for (stream, member) in peers.iter_mut().skip(1).map(|p| p.take().expect("every rank joined")) {
            members.push(member);
            streams.push(stream);
        }
        let accept = encode_accept(world, blob, &members);
        let until = after(timeouts.join.max(Duration::from_secs(1)));
        for (i, s) in streams.iter_mut().enumerate() {
            if let Err(e) = write_by(s, &accept, until) {
                let msg = format!("rendezvous: could not send the blob to {}: {e}", members[i + 1]);
                let reject = encode_reject(&msg);
                for s in streams.iter_mut() {
                    let _ = write_by(s, &reject, Instant::now() + Duration::from_secs(1));
                }
                return Err(Error::msg(msg));
            }
        }
        let store = Store::root(world, members.clone(), timeouts.collective, streams)?;
        Ok(Rendezvous { rank: 0, world_size: world, blob: *blob, members, store })
    }
}

// ---- handshake encoding ----

struct RawHello {
    version: u32,
    world_size: usize,
    rank: usize,
    local_rank: usize,
    graph_hash: u64,
    hostname: String,
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::msg(format!("{what} {v} does not fit the rendezvous protocol")))
}

fn encode_hello(h: &Hello) -> Result<Vec<u8>> {
    let host = truncate_hostname(&h.hostname);
    let mut out = Vec::with_capacity(30 + host.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&u32_of("world size", h.world_size)?.to_le_bytes());
    out.extend_from_slice(&u32_of("rank", h.rank)?.to_le_bytes());
    out.extend_from_slice(&u32_of("local rank", h.local_rank)?.to_le_bytes());
    out.extend_from_slice(&h.graph_hash.to_le_bytes());
    out.extend_from_slice(&(host.len() as u16).to_le_bytes());
    out.extend_from_slice(host.as_bytes());
    Ok(out)
}

/// Reads a hello; `None` when the first bytes are not the magic.
fn read_hello(stream: &mut TcpStream, deadline: Instant) -> io::Result<Option<RawHello>> {
    let mut magic = [0u8; 4];
    read_by(stream, &mut magic, deadline)?;
    if magic != MAGIC {
        return Ok(None);
    }
    let mut r = Reader { stream, deadline };
    let version = r.u32()?;
    let world_size = r.u32()? as usize;
    let rank = r.u32()? as usize;
    let local_rank = r.u32()? as usize;
    let graph_hash = r.u64()?;
    let len = r.u16()? as usize;
    let hostname = String::from_utf8_lossy(&r.bytes(len)?).into_owned();
    Ok(Some(RawHello { version, world_size, rank, local_rank, graph_hash, hostname }))
}

fn reply_head(status: u8) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(status);
    out
}

fn encode_reject(msg: &str) -> Vec<u8> {
    let mut out = reply_head(1);
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    out
}

fn encode_accept(world: usize, blob: &[u8; BLOB_LEN], members: &[Member]) -> Vec<u8> {
    let mut out = reply_head(0);
    out.extend_from_slice(&(world as u32).to_le_bytes());
    out.extend_from_slice(blob);
    for m in members {
        out.extend_from_slice(&(m.local_rank as u32).to_le_bytes());
        let host = truncate_hostname(&m.hostname);
        out.extend_from_slice(&(host.len() as u16).to_le_bytes());
        out.extend_from_slice(host.as_bytes());
    }
    out
}

// ---- I/O with deadlines ----

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// Why rank 0 lost `m` (`when`: "before ..."): a peer that closed its connection (its process exited or crashed)
/// is named as such, whether rank 0 was reading from it or writing to it when it noticed.
fn lost_connection(m: &Member, when: &str, e: &io::Error) -> String {
    if is_closed(e) {
        format!("{m} closed its connection {when} (the process exited or crashed)")
    } else {
        format!("the connection to {m} failed {when}: {e}")
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// Fills `buf` from `stream`, failing with `TimedOut` at `deadline` and `UnexpectedEof` when the peer closes.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_by(stream: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(&buf[done..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Reader<'a> {
    stream: &'a mut TcpStream,
    deadline: Instant,
}

impl Reader<'_> {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        read_by(self.stream, buf, self.deadline)
    }
    fn bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.fill(&mut v)?;
        Ok(v)
    }
    fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Whether a connected peer has closed its end (without blocking).
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let closed = match stream.peek(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !(e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted),
    };
    let _ = stream.set_nonblocking(false);
    closed
}

// ---- the store ----

struct Frame {
    op: u8,
    seq: u64,
    payload: Vec<u8>,
}

fn encode_frame(op: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + payload.len());
    out.push(op);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads one frame; `deadline` `None` waits as long as the connection lives (rank 0's reader threads).
fn read_frame(stream: &mut TcpStream, deadline: Option<Instant>) -> io::Result<Frame> {
    let mut head = [0u8; 17];
    match deadline {
        Some(d) => read_by(stream, &mut head, d)?,
        None => stream.read_exact(&mut head)?,
    }
    let op = head[0];
    let seq = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a store frame claims {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    match deadline {
        Some(d) => read_by(stream, &mut payload, d)?,
        None => stream.read_exact(&mut payload)?,
    }
    Ok(Frame { op, seq, payload })
}

enum Link {
    /// World of one.
    Alone,
    /// Rank 0: a connection per other rank (index rank − 1) and the frames their reader threads receive.
    Root { peers: Vec<TcpStream>, rx: Receiver<(usize, io::Result<Frame>)> },
    /// Rank > 0: the connection to rank 0.
    Leaf(TcpStream),
}

/// The connections of a rendezvous, kept for host-side collectives in a star around rank 0. Every rank must make
/// the same calls in the same order. After a failure every later call returns the same error.
pub struct Store {
    rank: usize,
    world_size: usize,
    members: Vec<Member>,
    timeout: Duration,
    seq: u64,
    failed: Option<String>,
    link: Link,
}

impl Store {
    fn new(rank: usize, world_size: usize, members: Vec<Member>, timeout: Duration, link: Link) -> Store {
        Store { rank, world_size, members, timeout, seq: 0, failed: None, link }
    }

    fn root(world: usize, members: Vec<Member>, timeout: Duration, peers: Vec<TcpStream>) -> Result<Store> {
        let (tx, rx) = mpsc::channel();
        for (i, s) in peers.iter().enumerate() {
            let mut reader = s.try_clone().map_err(|e| Error::msg(format!("rank 0: cloning a connection: {e}")))?;
            reader.set_read_timeout(None).map_err(|e| Error::msg(format!("rank 0: connection setup: {e}")))?;
            let tx = tx.clone();
            let rank = i + 1;
            std::thread::Builder::new()
                .name(format!("zeroconv-store-rank{rank}"))
                .spawn(move || loop {
                    let frame = read_frame(&mut reader, None);
                    let end = frame.is_err();
                    if tx.send((rank, frame)).is_err() || end {
                        break;
                    }
                })
                .map_err(|e| Error::msg(format!("rank 0: starting a store reader thread: {e}")))?;
        }
        Ok(Store::new(0, world, members, timeout, Link::Root { peers, rx }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Waits until every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.collective(OP_BARRIER, Vec::new(), |_| Ok(Vec::new()))?;
        Ok(())
    }

    /// Every rank's `data`, in rank order, on every rank (lengths may differ between ranks).
    pub fn all_gather_bytes(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let out = self.collective(OP_GATHER, data.to_vec(), |all| {
            let mut out = (all.len() as u32).to_le_bytes().to_vec();
            for d in all {
                out.extend_from_slice(&(d.len() as u64).to_le_bytes());
                out.extend_from_slice(d);
            }
            Ok(out)
        })?;
        decode_gather(&out, self.world_size)
            .ok_or_else(|| self.poison("all_gather_bytes: rank 0 sent a malformed result"))
    }

    /// Replaces `values` by their sum over the ranks, added in rank order (`((v0 + v1) + v2) + ...`) on rank 0 and
    /// broadcast, so every rank gets the same bits. Every rank must pass the same number of values.
    pub fn all_reduce_f64_sum(&mut self, values: &mut [f64]) -> Result<()> {
        let mine: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let members = self.members.clone();
        let n = values.len();
        let out = self.collective(OP_SUM_F64, mine, move |all| {
            let mut acc: Vec<f64> = decode_f64(&all[0]);
            for (rank, d) in all.iter().enumerate().skip(1) {
                if d.len() != all[0].len() {
                    return Err(format!(
                        "all_reduce_f64_sum: {} gave {} values but rank 0 gave {}; every rank must reduce the same \
                         number of values",
                        members[rank],
                        d.len() / 8,
                        n
                    ));
                }
                for (a, v) in acc.iter_mut().zip(d.chunks_exact(8)) {
                    *a += f64::from_le_bytes(v.try_into().expect("8 bytes"));
                }
            }
            Ok(acc.iter().flat_map(|v| v.to_le_bytes()).collect())
        })?;
        if out.len() != values.len() * 8 {
            return Err(self.poison(&format!(
                "all_reduce_f64_sum: rank 0 returned {} values but this rank ({}) gave {}",
                out.len() / 8,
                self.rank,
                values.len()
            )));
        }
        for (v, b) in values.iter_mut().zip(out.chunks_exact(8)) {
            *v = f64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    fn poison(&mut self, msg: &str) -> Error {
        self.failed = Some(msg.to_string());
        Error::msg(msg)
    }

    /// One collective: rank 0 gathers every rank's payload (in rank order), `combine`s them and sends the result to
    /// every rank; the others send theirs and wait for the result. Returns the result.
    fn collective(
        &mut self,
        op: u8,
        payload: Vec<u8>,
        combine: impl FnOnce(&[Vec<u8>]) -> std::result::Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>> {
        if let Some(msg) = &self.failed {
            return Err(Error::msg(msg.clone()));
        }
        self.seq += 1;
        let seq = self.seq;
        let name = op_name(op);
        let result = match &mut self.link {
            Link::Alone => combine(std::slice::from_ref(&payload)),
            Link::Root { peers, rx } => {
                let r = root_collective(op, seq, payload, combine, peers, rx, &self.members, self.timeout);
                if let Err(msg) = &r {
                    // Tell every rank still connected, so each fails with the same message.
                    let frame = encode_frame(OP_ERROR, seq, msg.as_bytes());
                    let until = Instant::now() + Duration::from_secs(1);
                    for s in peers.iter_mut() {
                        let _ = write_by(s, &frame, until);
                    }
                }
                r
            }
            Link::Leaf(stream) => {
                let root = &self.members[0];
                let wait = self.timeout.saturating_add(GRACE);
                let deadline = after(wait);
                let lost = |e: io::Error| -> String {
                    if is_closed(&e) {
                        format!(
                            "{root} closed its connection during {name} #{seq} (the process exited or crashed); \
                             its own log has the reason"
                        )
                    } else if is_timeout(&e) {
                        format!("{root} did not answer {name} #{seq} within {}", secs(wait))
                    } else {
                        format!("the connection to {root} failed during {name} #{seq}: {e}")
                    }
                };
                let r = write_by(stream, &encode_frame(op, seq, &payload), deadline)
                    .and_then(|_| read_frame(stream, Some(deadline)));
                match r {
                    // A write can fail because rank 0 already failed and closed: its error frame may be waiting.
                    Err(e) => Err(match read_frame(stream, Some(Instant::now() + Duration::from_millis(100))) {
                        Ok(f) if f.op == OP_ERROR => String::from_utf8_lossy(&f.payload).into_owned(),
                        _ => lost(e),
                    }),
                    Ok(f) if f.op == OP_ERROR => Err(String::from_utf8_lossy(&f.payload).into_owned()),
                    Ok(f) if f.op != op || f.seq != seq => Err(format!(
                        "{root} answered {} #{} while rank {} waited for {name} #{seq}: every rank must make the same \
                         collective calls in the same order",
                        op_name(f.op),
                        f.seq,
                        self.rank
                    )),
                    Ok(f) => Ok(f.payload),
                }
            }
        };
        result.map_err(|msg| {
            if let Link::Leaf(s) = &self.link {
                let _ = s.shutdown(Shutdown::Both);
            }
            self.poison(&msg)
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn root_collective(
    op: u8,
    seq: u64,
    payload: Vec<u8>,
    combine: impl FnOnce(&[Vec<u8>]) -> std::result::Result<Vec<u8>, String>,
    peers: &mut [TcpStream],
    rx: &Receiver<(usize, io::Result<Frame>)>,
    members: &[Member],
    timeout: Duration,
) -> std::result::Result<Vec<u8>, String> {
    let name = op_name(op);
    let world = peers.len() + 1;
    let deadline = after(timeout);
    let mut got: Vec<Option<Vec<u8>>> = vec![None; world];
    got[0] = Some(payload);
    let mut missing = world - 1;
    while missing > 0 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((rank, Ok(f))) => {
                let m = &members[rank];
                if f.op == OP_ERROR {
                    return Err(String::from_utf8_lossy(&f.payload).into_owned());
                }
                if f.op != op || f.seq != seq {
                    return Err(format!(
                        "{m} called {} #{} while rank 0 called {name} #{seq}: every rank must make the same \
                         collective calls in the same order",
                        op_name(f.op),
                        f.seq
                    ));
                }
                if got[rank].replace(f.payload).is_some() {
                    return Err(format!("{m} sent {name} #{seq} twice"));
                }
                missing -= 1;
            }
            Ok((rank, Err(e))) => {
                return Err(lost_connection(&members[rank], &format!("before {name} #{seq} completed"), &e));
            }
            Err(RecvTimeoutError::Timeout) => {
                let late: Vec<usize> = (1..world).filter(|&r| got[r].is_none()).collect();
                let hosts: Vec<String> = late.iter().map(|&r| members[r].to_string()).collect();
                return Err(format!(
                    "{} did not reach {name} #{seq} within {} (the other ranks did): stuck, much slower than the \
                     others, or making different collective calls",
                    hosts.join(", "),
                    secs(timeout)
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!("rank 0 lost every connection during {name} #{seq}"));
            }
        }
    }
    let all: Vec<Vec<u8>> = got.into_iter().map(|g| g.expect("every rank sent")).collect();
    let out = combine(&all)?;
    let frame = encode_frame(op, seq, &out);
    let until = after(timeout);
    for (i, s) in peers.iter_mut().enumerate() {
        if let Err(e) = write_by(s, &frame, until) {
            // A rank that died after sending its part is found here, when its result cannot be delivered.
            return Err(lost_connection(&members[i + 1], &format!("before it got the result of {name} #{seq}"), &e));
        }
    }
    Ok(out)
}

fn decode_f64(bytes: &[u8]) -> Vec<f64> {
    bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
}

fn decode_gather(bytes: &[u8], world: usize) -> Option<Vec<Vec<u8>>> {
    let count = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    if count != world {
        return None;
    }
    let mut at = 4;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?) as usize;
        at += 8;
        out.push(bytes.get(at..at.checked_add(len)?)?.to_vec());
        at += len;
    }
    (at == bytes.len()).then_some(out)
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the connections ends rank 0's reader threads and tells the other ranks this one is gone.
        match &self.link {
            Link::Alone => {}
            Link::Root { peers, .. } => {
                for s in peers {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            Link::Leaf(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}
