//! Ring collectives over TCP, for CPU tensors; CUDA tensors make a round trip through host memory.
//!
//! Each rank connects to rank + 1 and accepts rank - 1, so every rank sends on one socket and
//! receives on another. A ring step sends one chunk while it receives another, the send on a
//! scoped thread: when both neighbours send large buffers at once, neither can block the other.
//! Every message starts with a frame naming the operation, its sequence number, step and length,
//! so ranks that call different collectives, or pass tensors of different sizes, get an error
//! instead of garbage. Any error shuts both sockets down, which makes the neighbours fail at once
//! instead of waiting for their timeout, and leaves the collective unusable.

use crate::{Collective, ReduceOp, check_reduce_kind, gathered_shape};
use anyhow::{Context, Result, anyhow, bail, ensure};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Options of a [`TcpCollective`].
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Identifies the job and generation: a peer presenting another token is rejected at connect,
    /// so a straggler of an earlier generation cannot join a new ring.
    pub token: u64,
    /// Bounds ring formation and every socket read and write: a peer that sends or accepts
    /// nothing for this long is declared dead. It must exceed the largest skew between ranks
    /// entering the same collective (a slow data loader, a checkpoint on rank 0).
    pub timeout: Duration,
    /// Size of the pieces a received chunk is reduced in (rounded down to a multiple of 8).
    pub chunk_bytes: usize,
}

impl TcpOptions {
    /// Five-minute timeout and 4 MiB chunks.
    pub fn new(token: u64) -> Self {
        Self { token, timeout: Duration::from_secs(300), chunk_bytes: 4 << 20 }
    }
}

/// A bound listener whose address the coordinator relays to the other ranks, before
/// [`PendingTcp::connect`] forms the ring.
pub struct PendingTcp {
    listener: TcpListener,
    addr: SocketAddr,
}

impl PendingTcp {
    /// The bound address (with the actual port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forms the ring once every rank's address is known: `peers[i]` is the address rank `i`
    /// bound, `peers.len()` the world size. Returns within `opts.timeout`, or at once when a peer
    /// rejects this rank (another generation token, another world).
    pub fn connect(self, rank: usize, peers: Vec<SocketAddr>, opts: TcpOptions) -> Result<TcpCollective> {
        let world = peers.len();
        ensure!(rank < world, "tcp connect: rank {rank} is outside a world of {world} addresses");
        let neighbours = Neighbours { next: peers[(rank + 1) % world], prev: peers[(rank + world - 1) % world] };
        self.connect_neighbours(rank, world, neighbours, opts)
    }

    /// Forms the ring from this rank's neighbours alone (all the coordinator sends a rank of a
    /// large world). Same guarantees as [`PendingTcp::connect`].
    pub fn connect_neighbours(
        self,
        rank: usize,
        world: usize,
        neighbours: Neighbours,
        opts: TcpOptions,
    ) -> Result<TcpCollective> {
        ensure!(rank < world, "tcp connect: rank {rank} is outside a world of {world}");
        ensure!(!opts.timeout.is_zero(), "tcp connect: the timeout must be positive");
        let ring = if world == 1 { None } else { Some(self.form_ring(rank, world, neighbours, &opts)?) };
        tracing::debug!(rank, world, "tcp collective ready");
        Ok(TcpCollective {
            rank,
            world,
            ring,
            segment: (opts.chunk_bytes / 8).max(1) * 8,
            timeout: opts.timeout,
            state: Mutex::new(OpState { seq: 0, scratch: Vec::new() }),
            health: AtomicU8::new(HEALTHY),
        })
    }

    fn form_ring(&self, rank: usize, world: usize, addresses: Neighbours, opts: &TcpOptions) -> Result<Ring> {
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let deadline = Instant::now() + opts.timeout;
        // Which side failed first (0: none): its error is the cause, the other side's a consequence.
        let tripped = AtomicU8::new(0);
        let trip = |side: u8| {
            let _ = tripped.compare_exchange(0, side, Ordering::AcqRel, Ordering::Acquire);
        };
        let hello = Hello { version: PROTOCOL_VERSION, token: opts.token, world, from: rank, to: next };
        let (connected, accepted) = std::thread::scope(|s| {
            let connector = s.spawn(|| {
                let r = connect_next(addresses.next, next, &hello, deadline, &tripped);
                if r.is_err() {
                    trip(1);
                }
                r
            });
            let accepted = accept_prev(&self.listener, prev, &hello, deadline, &tripped);
            if accepted.is_err() {
                trip(2);
            }
            let connected = connector.join().unwrap_or_else(|_| Err(anyhow!("the connecting thread panicked")));
            (connected, accepted)
        });
        let context = |e: anyhow::Error| e.context(format!("tcp connect (rank {rank} of {world})"));
        let (next_stream, prev_stream) = match (connected, accepted) {
            (Ok(n), Ok(p)) => (n, p),
            (Err(e), _) if tripped.load(Ordering::Acquire) != 2 => return Err(context(e)),
            (_, Err(e)) | (Err(e), _) => return Err(context(e)),
        };
        for stream in [&next_stream, &prev_stream] {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(opts.timeout))?;
            stream.set_write_timeout(Some(opts.timeout))?;
        }
        Ok(Ring {
            next: Link { stream: next_stream, rank: next, addr: addresses.next },
            prev: Link { stream: prev_stream, rank: prev, addr: addresses.prev },
        })
    }
}

/// The collective addresses of a rank's ring neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbours {
    /// Of rank (rank + 1) % world, which this rank connects to.
    pub next: SocketAddr,
    /// Of rank (rank - 1) % world, which connects to this rank (its address names it in errors).
    pub prev: SocketAddr,
}

/// Ring collectives over TCP; see the module documentation.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// None in a world of one.
    ring: Option<Ring>,
    /// Of every socket read and write, for the error message.
    timeout: Duration,
    /// Bytes received and reduced at a time: `TcpOptions::chunk_bytes`, a multiple of 8.
    segment: usize,
    /// Serialises operations: the byte streams carry one collective at a time.
    state: Mutex<OpState>,
    health: AtomicU8,
}

const HEALTHY: u8 = 0;
const BROKEN: u8 = 1;
const ABORTED: u8 = 2;

struct OpState {
    /// Number of collectives issued so far; every rank must agree on it.
    seq: u64,
    /// Receive buffer of the reduce steps, kept between operations.
    scratch: Vec<u8>,
}

struct Ring {
    next: Link,
    prev: Link,
}

/// A connection to a neighbour, with the rank and address that name it in errors.
struct Link {
    stream: TcpStream,
    rank: usize,
    addr: SocketAddr,
}

impl TcpCollective {
    /// Binds the listener other ranks will connect to (port 0 picks a free port).
    pub fn bind(addr: SocketAddr) -> Result<PendingTcp> {
        let listener = TcpListener::bind(addr).with_context(|| format!("tcp: cannot bind {addr}"))?;
        let addr = listener.local_addr()?;
        Ok(PendingTcp { listener, addr })
    }

    /// Checks that the collective is usable and starts an operation: the lock and its number.
    fn begin(&self, op: Op) -> Result<(MutexGuard<'_, OpState>, u64)> {
        let mut state = self.state.lock().map_err(|_| self.error(op, anyhow!("an earlier operation panicked")))?;
        match self.health.load(Ordering::Acquire) {
            HEALTHY => {}
            ABORTED => return Err(self.error(op, anyhow!("the collective was aborted"))),
            _ => return Err(self.error(op, anyhow!("the collective failed earlier and can no longer be used"))),
        }
        let seq = state.seq;
        state.seq += 1;
        Ok((state, seq))
    }

    /// Names the operation and this rank in `e`.
    fn error(&self, op: Op, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("tcp {} on rank {} of {}", op.name(), self.rank, self.world))
    }

    /// Turns the failure of a started operation into its error, after shutting the sockets down.
    fn failed(&self, op: Op, e: anyhow::Error) -> anyhow::Error {
        self.shut_down(BROKEN);
        if self.health.load(Ordering::Acquire) == ABORTED {
            return self.error(op, anyhow!("the collective was aborted ({e:#})"));
        }
        self.error(op, e)
    }

    /// Marks the collective unusable and wakes any thread blocked on its sockets.
    fn shut_down(&self, health: u8) {
        if health == ABORTED {
            self.health.store(ABORTED, Ordering::Release);
        } else {
            let _ = self.health.compare_exchange(HEALTHY, health, Ordering::AcqRel, Ordering::Acquire);
        }
        if let Some(ring) = &self.ring {
            let _ = ring.next.stream.shutdown(Shutdown::Both);
            let _ = ring.prev.stream.shutdown(Shutdown::Both);
        }
    }

    /// One ring step: sends `send` to the next rank while receiving from the previous one.
    fn exchange(&self, ring: &Ring, frame: Frame, send: &[u8], incoming: Incoming<'_>) -> Result<()> {
        let expect = Frame { len: incoming.len() as u64, ..frame };
        let out = Frame { len: send.len() as u64, ..frame };
        if FRAME_LEN + send.len() <= INLINE_SEND_BYTES {
            // Fits in the kernel's socket buffers whether or not the next rank reads yet: no
            // sending thread, whose hand-off would dominate a small step.
            self.send(&ring.next, &out, send)?;
            return self.receive(&ring.prev, &expect, incoming);
        }
        // The side that fails first shuts the sockets down, which wakes the other; its error is
        // the cause, the other's only a consequence.
        let tripped = AtomicBool::new(false);
        let fail = |e: anyhow::Error| {
            let first = !tripped.swap(true, Ordering::AcqRel);
            if first {
                self.shut_down(BROKEN);
            }
            (first, e)
        };
        std::thread::scope(|s| {
            let sender = s.spawn(|| self.send(&ring.next, &out, send).map_err(fail));
            let received = self.receive(&ring.prev, &expect, incoming).map_err(fail);
            let sent = sender.join().unwrap_or_else(|_| Err((true, anyhow!("the sending thread panicked"))));
            let mut errors: Vec<_> = [sent.err(), received.err()].into_iter().flatten().collect();
            errors.sort_by_key(|(first, _)| !first);
            errors.into_iter().next().map_or(Ok(()), |(_, e)| Err(e))
        })
    }

    fn send(&self, link: &Link, frame: &Frame, payload: &[u8]) -> Result<()> {
        let mut stream = &link.stream;
        stream.write_all(&frame.encode()).map_err(|e| self.io_error(e, "sending to", link))?;
        stream.write_all(payload).map_err(|e| self.io_error(e, "sending to", link))
    }

    fn receive(&self, link: &Link, expect: &Frame, incoming: Incoming<'_>) -> Result<()> {
        self.receive_frame(link, expect)?;
        let mut stream = &link.stream;
        match incoming {
            Incoming::Copy(dst) => stream.read_exact(dst).map_err(|e| self.io_error(e, "receiving from", link)),
            Incoming::Reduce { dst, elem, scratch } => {
                let segment = self.segment.min(dst.len());
                if scratch.len() < segment {
                    scratch.resize(segment, 0);
                }
                for part in dst.chunks_mut(self.segment) {
                    let buf = &mut scratch[..part.len()];
                    stream.read_exact(buf).map_err(|e| self.io_error(e, "receiving from", link))?;
                    elem.accumulate(part, buf);
                }
                Ok(())
            }
        }
    }

    fn receive_frame(&self, link: &Link, expect: &Frame) -> Result<()> {
        let mut raw = [0u8; FRAME_LEN];
        (&link.stream).read_exact(&mut raw).map_err(|e| self.io_error(e, "receiving from", link))?;
        let got = Frame::decode(&raw)
            .ok_or_else(|| anyhow!("rank {} ({}) sent bytes that are not a collective frame", link.rank, link.addr))?;
        if got.op != expect.op || got.seq != expect.seq {
            bail!(
                "rank {} ({}) sent {} #{} while this rank runs {} #{}: the ranks issued different collectives",
                link.rank,
                link.addr,
                Op::describe(got.op),
                got.seq,
                Op::describe(expect.op),
                expect.seq
            );
        }
        if got.aux != expect.aux || got.len != expect.len {
            bail!(
                "rank {} ({}) sent {} bytes (step/root {}), this rank expects {} bytes (step/root {}): \
                 the ranks passed tensors of different sizes or roots",
                link.rank,
                link.addr,
                got.len,
                got.aux,
                expect.len,
                expect.aux
            );
        }
        Ok(())
    }

    fn io_error(&self, e: io::Error, direction: &str, link: &Link) -> anyhow::Error {
        let peer = format!("rank {} ({})", link.rank, link.addr);
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                anyhow!("timed out after {:?} {direction} {peer}: the peer is stalled or dead", self.timeout)
            }
            io::ErrorKind::UnexpectedEof => anyhow!("{peer} closed the connection ({direction} it)"),
            _ => anyhow!("{direction} {peer}: {e}"),
        }
    }

    /// Reduce-scatter then all-gather, over `world` chunks of `buf` (a whole number of elements
    /// each, some possibly empty).
    fn ring_all_reduce(&self, ring: &Ring, seq: u64, buf: &mut [u8], elem: Elem, scratch: &mut Vec<u8>) -> Result<()> {
        let (n, r) = (self.world, self.rank);
        let size = elem.size();
        let numel = buf.len() / size;
        let chunk = |i: usize| (numel * i / n * size)..(numel * (i + 1) / n * size);
        // Step s sends the partial sum of chunk r - s and adds the incoming one into chunk r - s - 1:
        // after n - 1 steps this rank holds the full sum of chunk r + 1.
        for s in 0..n - 1 {
            let (send, dst) = split_pair(buf, chunk((r + n - s) % n), chunk((r + 2 * n - s - 1) % n));
            let frame = Frame { op: Op::AllReduce as u32, seq, len: 0, aux: s as u64 };
            self.exchange(ring, frame, send, Incoming::Reduce { dst, elem, scratch: &mut *scratch })?;
        }
        // Then the full sums travel once around the ring.
        for s in 0..n - 1 {
            let (send, dst) = split_pair(buf, chunk((r + 1 + n - s) % n), chunk((r + n - s) % n));
            let frame = Frame { op: Op::AllReduce as u32, seq, len: 0, aux: (n + s) as u64 };
            self.exchange(ring, frame, send, Incoming::Copy(dst))?;
        }
        Ok(())
    }

    /// Each rank's slot of `buf` travels around the ring; slot r is filled on entry.
    fn ring_all_gather(&self, ring: &Ring, seq: u64, buf: &mut [u8]) -> Result<()> {
        let (n, r) = (self.world, self.rank);
        let slot = buf.len() / n;
        let range = |i: usize| i * slot..(i + 1) * slot;
        for s in 0..n - 1 {
            let (send, dst) = split_pair(buf, range((r + n - s) % n), range((r + 2 * n - s - 1) % n));
            let frame = Frame { op: Op::AllGather as u32, seq, len: 0, aux: s as u64 };
            self.exchange(ring, frame, send, Incoming::Copy(dst))?;
        }
        Ok(())
    }

    /// A pipeline from `root` along the ring: each rank forwards every received piece at once,
    /// and the rank before `root` only receives. A chain has no cycle, so one thread suffices.
    fn ring_broadcast(&self, ring: &Ring, seq: u64, buf: &mut [u8], root: usize) -> Result<()> {
        let position = (self.rank + self.world - root) % self.world;
        let frame = Frame { op: Op::Broadcast as u32, seq, len: buf.len() as u64, aux: root as u64 };
        if position == 0 {
            return self.send(&ring.next, &frame, buf);
        }
        self.receive_frame(&ring.prev, &frame)?;
        let forward = position + 1 < self.world;
        if forward {
            (&ring.next.stream).write_all(&frame.encode()).map_err(|e| self.io_error(e, "sending to", &ring.next))?;
        }
        for part in buf.chunks_mut(self.segment) {
            (&ring.prev.stream).read_exact(part).map_err(|e| self.io_error(e, "receiving from", &ring.prev))?;
            if forward {
                (&ring.next.stream).write_all(part).map_err(|e| self.io_error(e, "sending to", &ring.next))?;
            }
        }
        Ok(())
    }

    /// Runs a started operation on the ring, turning its failure into the collective's.
    fn on_ring<T>(&self, op: Op, ring: &Ring, f: impl FnOnce(&Ring) -> Result<T>) -> Result<T> {
        f(ring).map_err(|e| self.failed(op, e))
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_reduce_kind("tcp all_reduce", t.kind(), op)?;
        let (mut state, seq) = self.begin(Op::AllReduce)?;
        let Some(ring) = &self.ring else { return Ok(()) };
        let _no_grad = tch::no_grad_guard();
        self.on_ring(Op::AllReduce, ring, |ring| {
            // bf16 and f16 are summed in f32: one rounding at the end instead of one per hop.
            let kind = match t.kind() {
                Kind::BFloat16 | Kind::Half => Kind::Float,
                k => k,
            };
            let elem = Elem::of(kind);
            let mut work = HostBuffer::new(t, kind)?;
            self.ring_all_reduce(ring, seq, bytes_mut(&mut work.tensor), elem, &mut state.scratch)?;
            if op == ReduceOp::Avg {
                let _ = work.tensor.f_div_scalar_(self.world as f64)?;
            }
            work.write_back(t)
        })
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let (_state, seq) = self.begin(Op::AllGather)?;
        let _no_grad = tch::no_grad_guard();
        let shape = gathered_shape(t, self.world);
        let Some(ring) = &self.ring else { return Ok(t.f_reshape(shape)?.copy()) };
        self.on_ring(Op::AllGather, ring, |ring| {
            let rows = shape[0] / self.world as i64;
            let mut own_shape = shape.clone();
            own_shape[0] = rows;
            // Zeroed rather than empty: the ring writes into it through a byte slice.
            let mut out = Tensor::f_zeros(&shape, (t.kind(), Device::Cpu))?;
            out.f_narrow(0, self.rank as i64 * rows, rows)?.f_copy_(&t.f_reshape(own_shape)?)?;
            self.ring_all_gather(ring, seq, bytes_mut(&mut out))?;
            Ok(if t.device() == Device::Cpu { out } else { out.f_to_device(t.device())? })
        })
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        ensure!(root < self.world, "tcp broadcast: root {root} is outside a world of {}", self.world);
        let (_state, seq) = self.begin(Op::Broadcast)?;
        let Some(ring) = &self.ring else { return Ok(()) };
        let _no_grad = tch::no_grad_guard();
        self.on_ring(Op::Broadcast, ring, |ring| {
            let mut work = HostBuffer::new(t, t.kind())?;
            self.ring_broadcast(ring, seq, bytes_mut(&mut work.tensor), root)?;
            if self.rank == root { Ok(()) } else { work.write_back(t) }
        })
    }

    fn barrier(&self) -> Result<()> {
        let (_state, seq) = self.begin(Op::Barrier)?;
        let Some(ring) = &self.ring else { return Ok(()) };
        // An all-gather of empty messages: after n - 1 steps every rank has heard, through its
        // predecessors, from every other rank having entered the barrier.
        self.on_ring(Op::Barrier, ring, |ring| {
            for s in 0..self.world - 1 {
                let frame = Frame { op: Op::Barrier as u32, seq, len: 0, aux: s as u64 };
                self.exchange(ring, frame, &[], Incoming::Copy(&mut []))?;
            }
            Ok(())
        })
    }

    fn abort(&self) {
        self.shut_down(ABORTED);
    }
}

/// The collectives, as numbered on the wire.
#[derive(Clone, Copy)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(self) -> &'static str {
        Self::describe(self as u32)
    }

    fn describe(op: u32) -> &'static str {
        match op {
            1 => "all_reduce",
            2 => "all_gather",
            3 => "broadcast",
            4 => "barrier",
            _ => "an unknown operation",
        }
    }
}

/// Messages up to this size are sent before receiving, on the calling thread: well under the
/// 16 KiB Linux gives a socket's send buffer by default (net.ipv4.tcp_wmem), plus the receiver's.
const INLINE_SEND_BYTES: usize = 8 << 10;
const FRAME_MAGIC: u32 = u32::from_be_bytes(*b"ALBD");
const FRAME_LEN: usize = 32;

/// The header of every message: operation, sequence number, payload length, and the step (or
/// the root of a broadcast).
#[derive(Clone, Copy)]
struct Frame {
    op: u32,
    seq: u64,
    len: u64,
    aux: u64,
}

impl Frame {
    fn encode(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.aux.to_le_bytes());
        b
    }

    fn decode(b: &[u8; FRAME_LEN]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        (u32_at(0) == FRAME_MAGIC).then(|| Self { op: u32_at(4), seq: u64_at(8), len: u64_at(16), aux: u64_at(24) })
    }
}

/// Where a ring step puts what it receives.
enum Incoming<'a> {
    Copy(&'a mut [u8]),
    Reduce { dst: &'a mut [u8], elem: Elem, scratch: &'a mut Vec<u8> },
}

impl Incoming<'_> {
    fn len(&self) -> usize {
        match self {
            Incoming::Copy(dst) | Incoming::Reduce { dst, .. } => dst.len(),
        }
    }
}

/// The element types the ring sums (bf16 and f16 arrive as f32).
#[derive(Clone, Copy)]
enum Elem {
    F32,
    F64,
    I64,
}

impl Elem {
    fn of(kind: Kind) -> Self {
        match kind {
            Kind::Double => Elem::F64,
            Kind::Int64 => Elem::I64,
            _ => Elem::F32,
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }

    /// `dst += src`, element-wise, both in native byte order.
    fn accumulate(self, dst: &mut [u8], src: &[u8]) {
        match self {
            Elem::F32 => {
                add_in_place::<4>(dst, src, |a, b| (f32::from_ne_bytes(a) + f32::from_ne_bytes(b)).to_ne_bytes())
            }
            Elem::F64 => {
                add_in_place::<8>(dst, src, |a, b| (f64::from_ne_bytes(a) + f64::from_ne_bytes(b)).to_ne_bytes())
            }
            Elem::I64 => add_in_place::<8>(dst, src, |a, b| {
                i64::from_ne_bytes(a).wrapping_add(i64::from_ne_bytes(b)).to_ne_bytes()
            }),
        }
    }
}

fn add_in_place<const N: usize>(dst: &mut [u8], src: &[u8], add: impl Fn([u8; N], [u8; N]) -> [u8; N]) {
    let (dst, _) = dst.as_chunks_mut::<N>();
    let (src, _) = src.as_chunks::<N>();
    for (d, s) in dst.iter_mut().zip(src) {
        *d = add(*d, *s);
    }
}

/// Disjoint views of two ranges of `buf`: one to send, one to receive into.
fn split_pair(buf: &mut [u8], send: Range<usize>, recv: Range<usize>) -> (&[u8], &mut [u8]) {
    if send.end <= recv.start {
        let (head, tail) = buf.split_at_mut(recv.start);
        (&head[send], &mut tail[..recv.len()])
    } else {
        debug_assert!(recv.end <= send.start, "overlapping ring chunks");
        let (head, tail) = buf.split_at_mut(send.start);
        (&tail[..send.len()], &mut head[recv])
    }
}

/// A contiguous CPU tensor with the values of a caller's tensor in the kind the ring works in:
/// the caller's tensor itself when it already is one, else a copy to write back at the end.
struct HostBuffer {
    tensor: Tensor,
    aliased: bool,
}

impl HostBuffer {
    fn new(t: &Tensor, kind: Kind) -> Result<Self> {
        if t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() {
            return Ok(Self { tensor: t.shallow_clone(), aliased: true });
        }
        Ok(Self { tensor: t.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?, aliased: false })
    }

    fn write_back(self, t: &mut Tensor) -> Result<()> {
        if !self.aliased {
            t.f_copy_(&self.tensor)?;
        }
        Ok(())
    }
}

/// The bytes of a contiguous CPU tensor.
fn bytes_mut(t: &mut Tensor) -> &mut [u8] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        // An empty tensor's data pointer may be null, which a slice must never hold.
        return &mut [];
    }
    // SAFETY: a contiguous CPU tensor's `len` bytes start at data_ptr() and are initialised host
    // memory of its storage, which this handle keeps alive for the borrow. The `&mut` borrow
    // keeps this handle from being used meanwhile; other views of the same storage are the
    // caller's to leave alone during the operation, as with any in-place tensor operation.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<u8>(), len) }
}

const HELLO_MAGIC: u32 = u32::from_be_bytes(*b"ALBF");
const PROTOCOL_VERSION: u32 = 1;
const HELLO_LEN: usize = 32;
const REPLY_LEN: usize = 24;
/// How long an accepted connection may take to introduce itself before it is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Reply statuses of the handshake.
const ACCEPTED: u32 = 0;
const WRONG_TOKEN: u32 = 1;
const WRONG_PLACE: u32 = 2;
const WRONG_VERSION: u32 = 3;
const GAVE_UP: u32 = 4;

/// What a connecting rank says about itself: its generation, world, rank, and the rank it
/// believes it reached.
struct Hello {
    version: u32,
    token: u64,
    world: usize,
    from: usize,
    to: usize,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..16].copy_from_slice(&self.token.to_le_bytes());
        b[16..24].copy_from_slice(&(self.world as u64).to_le_bytes());
        b[24..28].copy_from_slice(&(self.from as u32).to_le_bytes());
        b[28..32].copy_from_slice(&(self.to as u32).to_le_bytes());
        b
    }

    fn decode(b: &[u8; HELLO_LEN]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        (u32_at(0) == HELLO_MAGIC).then(|| Self {
            version: u32_at(4),
            token: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            world: u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize,
            from: u32_at(24) as usize,
            to: u32_at(28) as usize,
        })
    }
}

/// The accepting rank's answer: a status, and its own token, rank and world for the message.
struct Reply {
    status: u32,
    token: u64,
    rank: usize,
    world: usize,
}

impl Reply {
    fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.token.to_le_bytes());
        b[16..20].copy_from_slice(&(self.rank as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(self.world as u32).to_le_bytes());
        b
    }

    fn decode(b: &[u8; REPLY_LEN]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        (u32_at(0) == HELLO_MAGIC).then(|| Self {
            status: u32_at(4),
            token: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            rank: u32_at(16) as usize,
            world: u32_at(20) as usize,
        })
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

/// Connects to the next rank (retrying until it listens) and introduces this rank.
fn connect_next(
    addr: SocketAddr,
    peer: usize,
    hello: &Hello,
    deadline: Instant,
    tripped: &AtomicU8,
) -> Result<TcpStream> {
    let mut stream = loop {
        if tripped.load(Ordering::Acquire) != 0 {
            bail!("gave up connecting to rank {peer} at {addr}");
        }
        let Some(left) = remaining(deadline) else { bail!("timed out connecting to rank {peer} at {addr}") };
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
            Ok(stream) => break stream,
            Err(e) => {
                tracing::debug!(%addr, peer, "tcp connect: retrying after {e}");
                std::thread::sleep(Duration::from_millis(20).min(left));
            }
        }
    };
    let left = remaining(deadline).unwrap_or(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    let peer_name = format!("rank {peer} at {addr}");
    stream.write_all(&hello.encode()).with_context(|| format!("introducing this rank to {peer_name}"))?;
    let mut raw = [0u8; REPLY_LEN];
    stream.read_exact(&mut raw).with_context(|| format!("waiting for {peer_name} to accept the connection"))?;
    let reply = Reply::decode(&raw).ok_or_else(|| anyhow!("{peer_name} is not an albef collective endpoint"))?;
    match reply.status {
        ACCEPTED if reply.token == hello.token && reply.rank == peer && reply.world == hello.world => Ok(stream),
        ACCEPTED => bail!(
            "{peer_name} answered as rank {} of {} with generation token {:#x}, expected rank {peer} of {} with {:#x}",
            reply.rank,
            reply.world,
            reply.token,
            hello.world,
            hello.token
        ),
        WRONG_TOKEN => bail!(
            "{peer_name} rejected the connection: generation token mismatch (ours {:#x}, theirs {:#x}); \
             one of the two belongs to another generation",
            hello.token,
            reply.token
        ),
        WRONG_PLACE => bail!(
            "{peer_name} rejected the connection: it is rank {} of {}, this rank claimed to be rank {} of {} \
             connecting to rank {peer}",
            reply.rank,
            reply.world,
            hello.from,
            hello.world
        ),
        WRONG_VERSION => bail!("{peer_name} rejected the connection: it speaks another protocol version"),
        GAVE_UP => bail!("{peer_name} gave up forming the ring: its own connection failed or timed out"),
        status => bail!("{peer_name} rejected the connection with unknown status {status}"),
    }
}

/// Accepts connections until the previous rank of this generation introduces itself; anything
/// else (a straggler of another generation, a stray client) is answered, dropped and logged.
fn accept_prev(
    listener: &TcpListener,
    prev: usize,
    ours: &Hello,
    deadline: Instant,
    tripped: &AtomicU8,
) -> Result<TcpStream> {
    // Non-blocking, so that the loop notices the deadline and a failure of the connecting side.
    listener.set_nonblocking(true)?;
    loop {
        if tripped.load(Ordering::Acquire) != 0 {
            // Answer the connections already waiting, so that their ranks learn why (another
            // generation, or this rank giving up) instead of seeing the listener reset them.
            while let Ok((stream, _)) = listener.accept() {
                let _ = handshake_incoming(stream, prev, ours, Duration::from_millis(200), true);
            }
            bail!("gave up waiting for rank {prev} to connect");
        }
        let Some(left) = remaining(deadline) else { bail!("timed out waiting for rank {prev} to connect") };
        match listener.accept() {
            Ok((stream, from)) => match handshake_incoming(stream, prev, ours, left.min(HELLO_TIMEOUT), false) {
                Ok(stream) => return Ok(stream),
                Err(e) => tracing::warn!(rank = ours.from, %from, "tcp connect: rejected a connection: {e:#}"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5).min(left)),
            Err(e) => return Err(e).context("accepting a connection"),
        }
    }
}

/// Reads a connecting rank's introduction and answers it; `giving_up` turns away even the
/// rank that was expected.
fn handshake_incoming(
    mut stream: TcpStream,
    prev: usize,
    ours: &Hello,
    timeout: Duration,
    giving_up: bool,
) -> Result<TcpStream> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut raw = [0u8; HELLO_LEN];
    stream.read_exact(&mut raw).context("reading the introduction")?;
    let hello = Hello::decode(&raw).ok_or_else(|| anyhow!("not an albef collective peer"))?;
    let status = if hello.version != PROTOCOL_VERSION {
        WRONG_VERSION
    } else if hello.token != ours.token {
        WRONG_TOKEN
    } else if hello.world != ours.world || hello.from != prev || hello.to != ours.from {
        WRONG_PLACE
    } else if giving_up {
        GAVE_UP
    } else {
        ACCEPTED
    };
    let reply = Reply { status, token: ours.token, rank: ours.from, world: ours.world };
    stream.write_all(&reply.encode()).context("answering the introduction")?;
    match status {
        ACCEPTED => Ok(stream),
        WRONG_TOKEN => bail!("generation token {:#x} is not ours ({:#x})", hello.token, ours.token),
        WRONG_PLACE => bail!(
            "it claims to be rank {} of {} connecting to rank {}, expected rank {prev} of {}",
            hello.from,
            hello.world,
            hello.to,
            ours.world
        ),
        GAVE_UP => bail!("this rank is giving up forming the ring"),
        _ => bail!("protocol version {} is not ours ({PROTOCOL_VERSION})", hello.version),
    }
}
