//! A TCP proxy that adds network delay, so local runs see the round trips loopback hides.
//!
//! ElastiCache in another availability zone adds about half a millisecond per round trip; on
//! loopback a round trip costs a few microseconds, so code that makes ten round trips where one
//! would do looks as fast as code that makes one. [`DelayProxy`] sits in front of a server and
//! holds every chunk for half the configured round-trip delay in each direction.
//!
//! Each direction of a connection is a queue of chunks with release times: the reader keeps
//! reading while earlier chunks wait, so a pipeline keeps its throughput and only its latency
//! grows, and chunks leave in the order they came. tokio's timer has millisecond granularity,
//! too coarse for a 0.25 ms hold, so the last stretch of every wait is served by one timer
//! thread that sleeps with the kernel's precision.
//!
//! It can also swallow connections ([`DelayProxy::swallow_connections`]): accept them, read
//! what comes, never forward nor answer, as a route that drops packets or a peer that died
//! while its client's environment was frozen.
//!
//! The proxy also counts round trips: the times a client sent after having received a reply
//! (or sent for the first time on a connection). A pipeline of any length is one round trip;
//! sequential commands are one each. A large pipeline may still be streaming in when the first
//! replies come back: a send while the client's earlier bytes are still held by the proxy
//! continues the same round trip rather than starting one.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// Bytes read from one side at a time.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    /// The round-trip delay in nanoseconds; each direction holds chunks for half of it.
    delay_nanos: AtomicU64,
    round_trips: AtomicU64,
    bytes: AtomicU64,
    connections: AtomicU64,
    /// Connections still to swallow; `u64::MAX` swallows every one.
    swallow: AtomicU64,
    /// What each swallowed connection has received, in the order they were accepted.
    swallowed: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
}

impl Shared {
    fn one_way(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed) / 2)
    }
}

/// A delaying, counting TCP proxy on a free loopback port. Stops (closing its connections)
/// when dropped. Runs on the tokio runtime it was started from.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// A proxy to `upstream` adding `delay` per round trip (`delay / 2` each way).
    pub async fn start(upstream: SocketAddr, delay: Duration) -> io::Result<DelayProxy> {
        let proxy = Self::listen(delay).await?;
        proxy.set_upstream(upstream);
        Ok(proxy)
    }

    /// A proxy whose upstream is not known yet (a cluster node must be told the proxy's port
    /// before it starts). Connections accepted before [`set_upstream`](Self::set_upstream) are
    /// closed at once.
    pub async fn listen(delay: Duration) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        shared
            .delay_nanos
            .store(delay.as_nanos() as u64, Ordering::Relaxed);
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(DelayProxy { addr, shared, task })
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().unwrap() = Some(upstream);
    }

    /// Changes the delay for chunks read from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_nanos
            .store(delay.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.shared.delay_nanos.load(Ordering::Relaxed))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://127.0.0.1:<port>`, for a proxy in front of Redis.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Round trips since the start or the last [`reset`](Self::reset), over all connections.
    pub fn round_trips(&self) -> u64 {
        self.shared.round_trips.load(Ordering::SeqCst)
    }

    /// Bytes forwarded in both directions since the start or the last reset.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start or the last reset.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Swallows the next `n` connections accepted (`u64::MAX`: every one from now on, `0`:
    /// none): each is accepted and read until the client closes it, and never forwarded nor
    /// answered.
    pub fn swallow_connections(&self, n: u64) {
        self.shared.swallow.store(n, Ordering::SeqCst);
    }

    /// What each swallowed connection has received so far, in the order they were accepted.
    pub fn swallowed(&self) -> Vec<Vec<u8>> {
        let swallowed = self.shared.swallowed.lock().unwrap();
        swallowed
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }

    pub fn reset(&self) {
        self.shared.round_trips.store(0, Ordering::SeqCst);
        self.shared.bytes.store(0, Ordering::SeqCst);
        self.shared.connections.store(0, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The task owns the listener and every connection's task.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors, most likely; back off rather than spin.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let swallow = shared
            .swallow
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => Some(n),
                n => Some(n - 1),
            })
            .is_ok();
        if swallow {
            let received = Arc::default();
            shared.swallowed.lock().unwrap().push(Arc::clone(&received));
            connections.spawn(swallow_connection(client, received));
            continue;
        }
        let shared = shared.clone();
        connections.spawn(async move {
            if let Err(e) = relay(client, &shared).await {
                tracing::debug!(error = %e, "proxied connection ended");
            }
        });
    }
}

/// Reads what the client sends until it closes, and answers nothing.
async fn swallow_connection(mut client: TcpStream, received: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0; CHUNK];
    while let Ok(n @ 1..) = client.read(&mut buf).await {
        received.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// Which way a chunk travels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Client to server: counts round trips.
    Up,
    /// Server to client: marks the client as answered.
    Down,
}

async fn relay(mut client: TcpStream, shared: &Shared) -> io::Result<()> {
    let upstream = *shared.upstream.lock().unwrap();
    let Some(upstream) = upstream else {
        return Ok(());
    };
    let mut server = TcpStream::connect(upstream).await?;
    // Without this, Nagle's algorithm would hold small replies for tens of milliseconds.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    // Both directions run in this one task, so a reply is marked delivered before the client's
    // next request can be read: the count cannot race.
    let link = Link {
        replied: AtomicBool::new(true),
        held_up: AtomicUsize::new(0),
    };
    tokio::try_join!(
        pump(client_read, server_write, shared, &link, Way::Up),
        pump(server_read, client_write, shared, &link, Way::Down),
    )?;
    Ok(())
}

/// What the two directions of one connection know about each other.
struct Link {
    /// A reply reached the client since it last sent.
    replied: AtomicBool,
    /// Chunks from the client read but not yet forwarded to the server.
    held_up: AtomicUsize,
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    shared: &Shared,
    link: &Link,
    way: Way,
) -> io::Result<()> {
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // The writer drains what is queued, then half-closes the other side.
                drop(queue);
                return Ok::<(), io::Error>(());
            }
            if way == Way::Up {
                let answered = link.replied.swap(false, Ordering::SeqCst);
                if answered && link.held_up.load(Ordering::SeqCst) == 0 {
                    shared.round_trips.fetch_add(1, Ordering::SeqCst);
                }
                link.held_up.fetch_add(1, Ordering::SeqCst);
            }
            shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
            let release = Instant::now() + shared.one_way();
            // The receiver lives until the writer fails, and then the connection is over.
            let _ = queue.send((release, buf[..n].to_vec()));
        }
    };
    let write = async {
        while let Some((release, chunk)) = queued.recv().await {
            wait_until(release).await;
            to.write_all(&chunk).await?;
            match way {
                Way::Up => {
                    link.held_up.fetch_sub(1, Ordering::SeqCst);
                }
                Way::Down => link.replied.store(true, Ordering::SeqCst),
            }
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

/// Waits until `at` with sub-millisecond precision: tokio's timer for the bulk of a long wait,
/// the precise timer thread for the rest.
async fn wait_until(at: Instant) {
    let now = Instant::now();
    if at <= now {
        return;
    }
    if at - now > Duration::from_millis(3) {
        tokio::time::sleep_until((at - Duration::from_millis(2)).into()).await;
    }
    if at > Instant::now() {
        let _ = precise_timer().at(at).await;
    }
}

/// One thread that fires wake-ups at their instants, sleeping on a condition variable in
/// between (futex timeouts, with the thread's timer slack set to the minimum).
struct PreciseTimer {
    queue: Mutex<Wakeups>,
    changed: Condvar,
}

#[derive(Default)]
struct Wakeups {
    heap: BinaryHeap<Wakeup>,
    next_seq: u64,
}

struct Wakeup {
    at: Instant,
    seq: u64,
    fire: oneshot::Sender<()>,
}

impl PartialEq for Wakeup {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Wakeup {}

impl PartialOrd for Wakeup {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Wakeup {
    /// Reversed, so the max-heap pops the earliest wake-up first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

fn precise_timer() -> &'static PreciseTimer {
    static TIMER: OnceLock<&'static PreciseTimer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static PreciseTimer = Box::leak(Box::new(PreciseTimer {
            queue: Mutex::default(),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("delay-proxy-timer".into())
            .spawn(move || timer.run())
            .expect("spawn the proxy's timer thread");
        timer
    })
}

impl PreciseTimer {
    fn at(&self, at: Instant) -> oneshot::Receiver<()> {
        let (fire, fired) = oneshot::channel();
        let mut queue = self.queue.lock().unwrap();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        queue.heap.push(Wakeup { at, seq, fire });
        drop(queue);
        self.changed.notify_one();
        fired
    }

    fn run(&self) {
        #[cfg(target_os = "linux")]
        // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe {
            // The default 50 us slack would be a fifth of a 0.25 ms hold.
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let mut queue = self.queue.lock().unwrap();
        loop {
            let now = Instant::now();
            while queue.heap.peek().is_some_and(|w| w.at <= now) {
                let due = queue.heap.pop().expect("peeked");
                // The waiter may have gone away (its connection closed); nothing to do then.
                let _ = due.fire.send(());
            }
            queue = match queue.heap.peek() {
                None => self.changed.wait(queue).unwrap(),
                Some(next) => {
                    let left = next.at.saturating_duration_since(now);
                    self.changed.wait_timeout(queue, left).unwrap().0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::RedisServer;

    async fn redis_behind(delay: Duration) -> (RedisServer, DelayProxy) {
        let redis = RedisServer::start().await.expect("start redis");
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port()));
        let proxy = DelayProxy::start(upstream, delay).await.expect("proxy");
        (redis, proxy)
    }

    async fn read_exact_len(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        stream.read_exact(&mut buf).await.expect("reply");
        buf
    }

    #[tokio::test]
    async fn a_round_trip_takes_at_least_the_delay() {
        let (_redis, proxy) = redis_behind(Duration::from_millis(20)).await;
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = Instant::now();
        conn.write_all(b"PING\r\n").await.unwrap();
        assert_eq!(read_exact_len(&mut conn, 7).await, b"+PONG\r\n");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(20), "PING took {took:?}");
    }

    #[tokio::test]
    async fn round_trips_are_counted_per_exchange_not_per_command() {
        let (_redis, proxy) = redis_behind(Duration::from_millis(1)).await;
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        for _ in 0..3 {
            conn.write_all(b"PING\r\n").await.unwrap();
            assert_eq!(read_exact_len(&mut conn, 7).await, b"+PONG\r\n");
        }
        assert_eq!(proxy.round_trips(), 3, "three sequential PINGs");
        assert_eq!(proxy.bytes(), 3 * (6 + 7));

        proxy.reset();
        assert_eq!((proxy.round_trips(), proxy.bytes()), (0, 0));
        conn.write_all(b"PING\r\nPING\r\nPING\r\n").await.unwrap();
        assert_eq!(read_exact_len(&mut conn, 21).await, b"+PONG\r\n".repeat(3));
        assert_eq!(proxy.round_trips(), 1, "one pipeline of three PINGs");
    }

    /// Replies to the first commands come back while the rest are still being sent: still one
    /// round trip, and the replies keep the commands' order.
    #[tokio::test]
    async fn a_pipeline_in_many_chunks_is_one_round_trip_in_order() {
        // A long delay against short pauses between pieces: the proxy keeps some of the
        // request held up the whole time, however slowly a loaded machine runs the sender.
        let (_redis, proxy) = redis_behind(Duration::from_millis(200)).await;
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        let n = 2000;
        let mut request = Vec::new();
        for i in 0..n {
            request.extend_from_slice(format!("ECHO {i}\r\n").as_bytes());
        }
        let (mut read, mut write) = conn.split();
        let send = async {
            // Small pieces with pauses (far shorter than the delay), so the proxy sees many
            // chunks and the first replies arrive while the rest is still being sent.
            for piece in request.chunks(request.len() / 20 + 1) {
                write.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let expected: Vec<u8> = (0..n)
            .flat_map(|i| {
                let s = i.to_string();
                format!("${}\r\n{s}\r\n", s.len()).into_bytes()
            })
            .collect();
        let receive = async {
            let mut got = vec![0; expected.len()];
            read.read_exact(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(send, receive);
        assert_eq!(got, expected, "replies in order");
        assert_eq!(proxy.round_trips(), 1);
    }

    #[tokio::test]
    async fn swallowed_connections_are_read_and_never_answered() {
        let (_redis, proxy) = redis_behind(Duration::ZERO).await;
        proxy.swallow_connections(1);
        let mut swallowed = TcpStream::connect(proxy.addr()).await.unwrap();
        swallowed.write_all(b"PING\r\n").await.unwrap();
        let mut forwarded = TcpStream::connect(proxy.addr()).await.unwrap();
        forwarded.write_all(b"PING\r\n").await.unwrap();
        assert_eq!(read_exact_len(&mut forwarded, 7).await, b"+PONG\r\n");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(200), swallowed.read(&mut buf));
        assert!(read.await.is_err(), "the swallowed connection answered");
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.swallowed() != [b"PING\r\n".to_vec()] {
            assert!(Instant::now() < deadline, "{:?}", proxy.swallowed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn the_proxy_stops_when_dropped() {
        let (_redis, proxy) = redis_behind(Duration::ZERO).await;
        let addr = proxy.addr();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"PING\r\n").await.unwrap();
        assert_eq!(read_exact_len(&mut conn, 7).await, b"+PONG\r\n");
        drop(proxy);
        // The abort takes effect at the task's next poll.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "the dropped proxy still accepts");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut buf = [0u8; 1];
        let n = conn.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "open connections are closed");
    }
}
