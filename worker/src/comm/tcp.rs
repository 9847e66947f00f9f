//! The TCP communicator for CPU workers: a full mesh of TCP connections between the ranks,
//! one per pair, set up from the addresses the coordinator sends in an assignment. Each link
//! has a writer thread (sends never block the caller, so exchanges cannot deadlock) and is
//! read by the calling thread with a timeout: a dead peer gives an error (EOF at once when its
//! process dies, the timeout when its host vanishes), never a hang.

use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use cluster::tls::ClusterTls;

use super::{Comm, CommError, check_parts, frame, sub_members, tls};

const MAGIC: u32 = 0x5452_4d43; // "TRMC"
/// How long a connecting rank waits between attempts while its peer is not listening yet.
const RETRY: Duration = Duration::from_millis(20);

/// The socket a worker accepts its peers' links on; bound once, reused by every assignment.
/// With the cluster's TLS, every link it accepts or dials is mutual TLS.
#[derive(Debug)]
pub struct CommListener {
    listener: TcpListener,
    tls: Option<ClusterTls>,
}

impl CommListener {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(CommListener { listener, tls: None })
    }

    /// Links over mutual TLS with the cluster CA (`None`: plain TCP).
    pub fn with_tls(self, tls: Option<ClusterTls>) -> Self {
        CommListener { tls, ..self }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An established link's stream: the socket, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(TcpStream, Box<tokio_rustls::TlsStream<tokio::net::TcpStream>>),
}

/// One established link to a peer.
struct Link {
    addr: String,
    /// The socket, to close the link from any thread.
    stream: TcpStream,
    reader: Mutex<Box<dyn Read + Send>>,
    /// `None` once the mesh is closing.
    writer: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Frames sent to / received from this peer; every frame carries its number, so a
    /// peer that runs other operations than ours is caught at once.
    sent: AtomicU64,
    received: AtomicU64,
}

struct Mesh {
    rank: usize,
    /// Indexed by global rank; `None` for this rank.
    links: Vec<Option<Link>>,
    timeout: Duration,
    failed: Mutex<Option<CommError>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Frames already handed to the writers are delivered before the links close (a
        // writer gives up after the timeout if its peer stops reading).
        for link in self.links.iter().flatten() {
            link.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        for link in self.links.iter().flatten() {
            if let Some(t) = link.writer_thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
            }
            let _ = link.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("rank", &self.rank).field("links", &self.links.len()).finish_non_exhaustive()
    }
}

/// A communicator over (a subset of) a TCP mesh.
#[derive(Debug, Clone)]
pub struct TcpComm {
    mesh: Arc<Mesh>,
    /// Global ranks of this communicator's members, ascending.
    members: Vec<usize>,
    /// This rank's index in `members`.
    me: usize,
}

/// Options of [`TcpComm::connect`].
#[derive(Debug, Clone, Copy)]
pub struct TcpOptions {
    /// A collective that waits longer than this for a peer fails.
    pub timeout: Duration,
    /// Setting up the mesh fails when a peer has not connected by then.
    pub setup_timeout: Duration,
}

impl TcpComm {
    /// Builds the mesh for rank `rank` of `peers` (every rank's [`CommListener`] address).
    /// Higher ranks connect to lower ones; a handshake checks the placement `epoch` and the
    /// world size, so links from another epoch's assignment are refused.
    pub fn connect(listener: &CommListener, epoch: u64, rank: usize, peers: &[String], options: TcpOptions) -> Result<TcpComm, CommError> {
        let world = peers.len();
        if rank >= world {
            return Err(CommError::Setup(format!("rank {rank} is outside a world of {world}")));
        }
        let deadline = Instant::now() + options.setup_timeout;
        let mut streams: Vec<Option<Stream>> = (0..world).map(|_| None).collect();
        let tls = listener.tls.as_ref();
        let (lower, higher) = std::thread::scope(|s| {
            let dialer = s.spawn(|| (0..rank).map(|peer| dial(tls, &peers[peer], peer, epoch, rank, world, deadline)).collect::<Result<Vec<_>, _>>());
            let accepted = accept_all(listener, epoch, rank, world, deadline);
            let dialed = dialer.join().unwrap_or_else(|_| Err(CommError::Setup("the dialing thread panicked".into())));
            (dialed, accepted)
        });
        for (peer, stream) in lower?.into_iter().enumerate() {
            streams[peer] = Some(stream);
        }
        for (peer, stream) in higher? {
            streams[peer] = Some(stream);
        }
        let links = streams
            .into_iter()
            .enumerate()
            .map(|(peer, s)| s.map(|s| Link::new(s, peers[peer].clone(), options.timeout)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let mesh = Arc::new(Mesh { rank, links, timeout: options.timeout, failed: Mutex::new(None) });
        Ok(TcpComm { mesh, members: (0..world).collect(), me: rank })
    }

    fn link(&self, member: usize) -> &Link {
        self.mesh.links[self.members[member]].as_ref().expect("a link to every other member")
    }

    /// Fails fast once any operation on the mesh has failed.
    fn check(&self) -> Result<(), CommError> {
        match &*self.mesh.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Records the mesh's first failure and closes every link, so the peers' pending and
    /// next operations fail at once too (a failure spreads through the replica in
    /// milliseconds instead of each rank waiting out its timeout).
    fn fail(&self, e: CommError) -> CommError {
        let mut failed = self.mesh.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none() {
            for link in self.mesh.links.iter().flatten() {
                let _ = link.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        failed.get_or_insert(e).clone()
    }

    fn peer_error(&self, member: usize, message: String) -> CommError {
        self.fail(CommError::Peer { peer: self.members[member], addr: self.link(member).addr.clone(), message })
    }

    fn send_to(&self, member: usize, data: &[f32]) -> Result<(), CommError> {
        let link = self.link(member);
        let frame = frame::encode(link.sent.fetch_add(1, Ordering::Relaxed), data);
        let writer = link.writer.lock().unwrap_or_else(|e| e.into_inner());
        let sent = writer.as_ref().map(|w| w.send(frame));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.peer_error(member, "the connection is closed".into())),
        }
    }

    fn recv_from(&self, member: usize) -> Result<Vec<f32>, CommError> {
        let link = self.link(member);
        let mut stream = link.reader.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.mesh.timeout;
        let describe = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no data for {timeout:?}; the peer is stuck or gone")
            }
            std::io::ErrorKind::UnexpectedEof => "the peer closed the connection (its process ended)".to_owned(),
            _ => format!("connection failed: {e}"),
        };
        let expected = link.received.fetch_add(1, Ordering::Relaxed);
        frame::read(&mut *stream, expected).map_err(|e| match e {
            frame::FrameError::Io(e) => self.peer_error(member, describe(e)),
            out_of_step => self.peer_error(member, out_of_step.to_string()),
        })
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(move |&m| m != self.me)
    }

    /// Sends `data` to every other member, then returns every member's data by rank.
    fn exchange(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        self.check()?;
        for m in self.others() {
            self.send_to(m, data)?;
        }
        (0..self.members.len()).map(|m| if m == self.me { Ok(data.to_vec()) } else { self.recv_from(m) }).collect()
    }
}

impl Link {
    fn new(stream: Stream, addr: String, timeout: Duration) -> Result<Link, CommError> {
        let setup = |e: std::io::Error| CommError::Setup(format!("link to {addr}: {e}"));
        let (socket, reader, write_half): (TcpStream, Box<dyn Read + Send>, Box<dyn Write + Send>) = match stream {
            Stream::Plain(socket) => {
                socket.set_nodelay(true).map_err(setup)?;
                socket.set_read_timeout(Some(timeout)).map_err(setup)?;
                socket.set_write_timeout(Some(timeout)).map_err(setup)?;
                let (reader, writer) = (socket.try_clone().map_err(setup)?, socket.try_clone().map_err(setup)?);
                (socket, Box::new(reader), Box::new(writer))
            }
            Stream::Tls(socket, tls) => {
                socket.set_nodelay(true).map_err(setup)?;
                let (reader, writer) = tls::split(*tls, timeout);
                (socket, Box::new(reader), Box::new(writer))
            }
        };
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("comm-writer".into())
            .spawn(move || {
                let mut w = BufWriter::with_capacity(1 << 16, write_half);
                for frame in rx {
                    if w.write_all(&frame).and_then(|()| w.flush()).is_err() {
                        break;
                    }
                }
            })
            .map_err(setup)?;
        Ok(Link {
            addr,
            stream: socket,
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }
}

fn handshake(epoch: u64, rank: usize, world: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&epoch.to_le_bytes());
    h[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    h[16..].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

/// Connects to lower rank `peer` at `addr`, retrying until it accepts us for `epoch`.
fn dial(tls: Option<&ClusterTls>, addr: &str, peer: usize, epoch: u64, rank: usize, world: usize, deadline: Instant) -> Result<Stream, CommError> {
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match try_dial(tls, addr, epoch, rank, world) {
            Ok(Some(stream)) => return Ok(stream),
            Ok(None) => last = "refused our epoch or world size".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(RETRY);
    }
    Err(CommError::Setup(format!("rank {rank} could not link to rank {peer} at {addr} for epoch {epoch}: {last}")))
}

fn try_dial(tls: Option<&ClusterTls>, addr: &str, epoch: u64, rank: usize, world: usize) -> std::io::Result<Option<Stream>> {
    let target = match addr.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(addr)?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} does not resolve")))?,
    };
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    if let Some(tls) = tls {
        // The socket stays non-blocking: the TLS stream on the links' runtime shares it.
        let (secured, ack) = tls::dial(tls, &stream, handshake(epoch, rank, world))?;
        return Ok((ack == 1).then_some(Stream::Tls(stream, Box::new(secured))));
    }
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(&handshake(epoch, rank, world))?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack)?;
    Ok((ack[0] == 1).then_some(Stream::Plain(stream)))
}

/// Accepts the links of every rank above `rank`.
fn accept_all(listener: &CommListener, epoch: u64, rank: usize, world: usize, deadline: Instant) -> Result<Vec<(usize, Stream)>, CommError> {
    let mut got: Vec<(usize, Stream)> = Vec::new();
    while got.len() < world - rank - 1 {
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (rank + 1..world).filter(|r| !got.iter().any(|(p, _)| p == r)).collect();
            return Err(CommError::Setup(format!("ranks {missing:?} did not link to rank {rank} for epoch {epoch}")));
        }
        let stream = match listener.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(CommError::Setup(format!("accepting links: {e}"))),
        };
        // A connection that fails its handshake (no certificate of the cluster's, another
        // epoch, a stray client) is dropped.
        let linked: Vec<usize> = got.iter().map(|(p, _)| *p).collect();
        let judge = move |h: &[u8; 20]| judge(h, epoch, rank, world, &linked);
        let accepted = match &listener.tls {
            Some(tls) => tls::accept(tls, &stream, judge).map(|a| a.map(|(peer, secured)| (peer, Stream::Tls(stream, Box::new(secured))))),
            None => plain_handshake(&stream, judge).map(|peer| peer.map(|p| (p, Stream::Plain(stream)))),
        };
        match accepted {
            Ok(Some(link)) => got.push(link),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "a link's handshake failed"),
        }
    }
    Ok(got)
}

/// The peer a link's hello names, if it is one this rank waits for in `epoch`.
fn judge(h: &[u8; 20], epoch: u64, rank: usize, world: usize, linked: &[usize]) -> Option<usize> {
    let field = |r: std::ops::Range<usize>| {
        u64::from_le_bytes({
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&h[r]);
            b
        })
    };
    let peer = field(12..16) as usize;
    let ok = field(0..4) == MAGIC as u64 && field(4..12) == epoch && field(16..20) as usize == world && peer > rank && peer < world && !linked.contains(&peer);
    ok.then_some(peer)
}

fn plain_handshake(mut stream: &TcpStream, judge: impl FnOnce(&[u8; 20]) -> Option<usize>) -> std::io::Result<Option<usize>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut h = [0u8; 20];
    stream.read_exact(&mut h)?;
    let peer = judge(&h);
    stream.write_all(&[peer.is_some() as u8])?;
    Ok(peer)
}

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.me
    }

    fn world(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        if self.members.len() == 1 {
            return Ok(());
        }
        let all = self.exchange(data)?;
        if let Some(bad) = all.iter().find(|d| d.len() != data.len()) {
            return Err(self.fail(CommError::Usage(format!("all_reduce of {} elements met {}", data.len(), bad.len()))));
        }
        data.copy_from_slice(&all[0]);
        for part in &all[1..] {
            for (d, p) in data.iter_mut().zip(part) {
                *d += p;
            }
        }
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        let all = self.exchange(data)?;
        if let Some(bad) = all.iter().find(|d| d.len() != data.len()) {
            return Err(self.fail(CommError::Usage(format!("all_gather of {} elements met {}", data.len(), bad.len()))));
        }
        Ok(all.concat())
    }

    fn all_to_all_v(&self, mut send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        check_parts(&send, self.members.len())?;
        self.check()?;
        for m in self.others() {
            self.send_to(m, &send[m])?;
        }
        let own = std::mem::take(&mut send[self.me]);
        let mut own = Some(own);
        (0..self.members.len()).map(|m| if m == self.me { Ok(own.take().unwrap_or_default()) } else { self.recv_from(m) }).collect()
    }

    fn send(&self, to: usize, data: &[f32]) -> Result<(), CommError> {
        if to >= self.members.len() || to == self.me {
            return Err(CommError::Usage(format!("send to rank {to} from rank {} of {}", self.me, self.members.len())));
        }
        self.check()?;
        self.send_to(to, data)
    }

    fn recv(&self, from: usize, len: usize) -> Result<Vec<f32>, CommError> {
        if from >= self.members.len() || from == self.me {
            return Err(CommError::Usage(format!("recv from rank {from} at rank {} of {}", self.me, self.members.len())));
        }
        self.check()?;
        let data = self.recv_from(from)?;
        if data.len() != len {
            return Err(self.fail(CommError::Usage(format!("expected {len} elements from rank {from}, got {}", data.len()))));
        }
        Ok(data)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.members.len() {
            return Err(CommError::Usage(format!("broadcast from rank {root} of {}", self.members.len())));
        }
        if self.me == root {
            self.check()?;
            self.others().try_for_each(|m| self.send_to(m, data))
        } else {
            let got = self.recv(root, data.len())?;
            data.copy_from_slice(&got);
            Ok(())
        }
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange(&[]).map(drop)
    }

    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Comm>, CommError> {
        let (members, me) = sub_members(&self.members, self.me, ranks)?;
        Ok(Arc::new(TcpComm { mesh: self.mesh.clone(), members, me }))
    }
}

impl TcpComm {
    /// The global rank of this process in the mesh.
    pub fn global_rank(&self) -> usize {
        self.mesh.rank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> TcpOptions {
        TcpOptions { timeout: Duration::from_secs(5), setup_timeout: Duration::from_secs(10) }
    }

    /// Runs `f(comm)` on `world` ranks, each on its own thread with its own listener.
    fn run<R: Send>(world: usize, f: impl Fn(TcpComm) -> R + Sync) -> Vec<R> {
        run_with(world, |_| None, f)
    }

    /// The cluster TLS of a process with a certificate of `ca`.
    fn member(ca: &cluster::tls::Authority) -> Option<ClusterTls> {
        let node = ca.issue("rank", &[]).unwrap();
        Some(ClusterTls::from_pem(ca.ca_pem().into(), node.cert_pem.into(), node.key_pem.into()).unwrap())
    }

    fn run_with<R: Send>(world: usize, tls: impl Fn(usize) -> Option<ClusterTls>, f: impl Fn(TcpComm) -> R + Sync) -> Vec<R> {
        let listeners: Vec<CommListener> = (0..world).map(|r| CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap().with_tls(tls(r))).collect();
        let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (peers, f) = (&peers, &f);
                    s.spawn(move || f(TcpComm::connect(l, 7, rank, peers, options()).expect("mesh")))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    #[test]
    fn collectives_agree_on_every_rank() {
        collectives_agree(run(3, collectives));
    }

    /// The same collectives over mutual TLS give the same results.
    #[test]
    fn collectives_agree_over_mutual_tls() {
        let ca = cluster::tls::Authority::new("cluster").unwrap();
        collectives_agree(run_with(3, |_| member(&ca), collectives));
    }

    /// A process whose certificate another CA signed links to no rank, and no rank to it.
    #[test]
    fn a_peer_without_the_cluster_certificate_cannot_join_the_mesh() {
        let (ca, rogue) = (cluster::tls::Authority::new("cluster").unwrap(), cluster::tls::Authority::new("self-signed").unwrap());
        let short = TcpOptions { timeout: Duration::from_secs(1), setup_timeout: Duration::from_millis(1500) };
        for (rogue_rank, tls) in [(1, Some(&rogue)), (1, None), (0, Some(&rogue))] {
            let l0 = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap().with_tls(if rogue_rank == 0 { tls.and_then(member) } else { member(&ca) });
            let l1 = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap().with_tls(if rogue_rank == 1 { tls.and_then(member) } else { member(&ca) });
            let peers = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| TcpComm::connect(&l0, 1, 0, &peers, short).map(drop));
                let b = s.spawn(|| TcpComm::connect(&l1, 1, 1, &peers, short).map(drop));
                (a.join().unwrap(), b.join().unwrap())
            });
            assert!(matches!(a, Err(CommError::Setup(ref m)) if m.contains("ranks [1] did not link")), "rogue rank {rogue_rank}: {a:?}");
            assert!(matches!(b, Err(CommError::Setup(ref m)) if m.contains("could not link to rank 0")), "rogue rank {rogue_rank}: {b:?}");
        }
    }

    type Collected = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>, Vec<f32>, Vec<f32>, Vec<f32>);

    fn collectives(c: TcpComm) -> Collected {
        {
            let r = c.rank() as f32;
            let mut sum = vec![r, 10.0 * r, 0.1];
            c.all_reduce_sum(&mut sum).unwrap();
            let gathered = c.all_gather(&[r, r]).unwrap();
            let sends = (0..3).map(|to| vec![r * 10.0 + to as f32; to + c.rank()]).collect();
            let got = c.all_to_all_v(sends).unwrap();
            let mut b = vec![r; 2];
            c.broadcast(&mut b, 2).unwrap();
            if c.rank() == 0 {
                c.send(1, &[42.0]).unwrap();
            }
            let p2p = if c.rank() == 1 { c.recv(0, 1).unwrap() } else { vec![] };
            c.barrier().unwrap();
            // A sub-communicator of ranks 0 and 2 over the same links.
            let sub = if c.rank() != 1 { Some(c.split(&[0, 2]).unwrap()) } else { Some(c.split(&[1]).unwrap()) };
            let mut s = vec![r];
            sub.as_ref().unwrap().all_reduce_sum(&mut s).unwrap();
            (sum, gathered, got, b, p2p, s)
        }
    }

    fn collectives_agree(out: Vec<Collected>) {
        for (rank, (sum, gathered, got, b, p2p, s)) in out.into_iter().enumerate() {
            assert_eq!(sum, vec![3.0, 30.0, 0.1 + 0.1 + 0.1]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            for (from, part) in got.iter().enumerate() {
                assert_eq!(part, &vec![from as f32 * 10.0 + rank as f32; rank + from]);
            }
            assert_eq!(b, vec![2.0, 2.0]);
            assert_eq!(p2p, if rank == 1 { vec![42.0] } else { vec![] });
            assert_eq!(s, if rank == 1 { vec![1.0] } else { vec![2.0] });
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let out = run(2, |c| {
            if c.rank() == 1 {
                drop(c); // The process "dies": its links close.
                return None;
            }
            let started = Instant::now();
            let err = c.all_reduce_sum(&mut [1.0]).expect_err("peer is gone");
            let again = c.barrier().expect_err("the mesh stays failed");
            Some((err, again, started.elapsed()))
        });
        let (err, again, took) = out[0].clone().expect("rank 0 result");
        assert!(err.to_string().contains("rank 1"), "{err}");
        assert_eq!(err.to_string(), again.to_string());
        assert!(took < Duration::from_secs(5), "failed on EOF, not the timeout: {took:?}");
    }

    #[test]
    fn links_from_another_epoch_are_refused() {
        let l0 = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l1 = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peers = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
        let short = TcpOptions { timeout: Duration::from_secs(1), setup_timeout: Duration::from_millis(300) };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| TcpComm::connect(&l0, 1, 0, &peers, short).map(drop));
            let b = s.spawn(|| TcpComm::connect(&l1, 2, 1, &peers, short).map(drop));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(matches!(a, Err(CommError::Setup(_))), "{a:?}");
        assert!(matches!(b, Err(CommError::Setup(ref m)) if m.contains("epoch 2")), "{b:?}");
    }
}
