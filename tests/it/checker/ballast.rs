//! Memory pressure (issue 20): ballast written into a full node throughout the writes, each key
//! evicting the product's nearest-expiry keys (see [`MemoryPressure`]), and the evictions
//! counted.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::StreamExt as _;
use redis::AsyncCommands as _;
use tokio::sync::watch;

use super::actors::Phase;
use super::config::MemoryPressure;
use super::system::{look, node_connection, Look};
use crate::support::info_field;

/// Past the positions' 25 hours and short of the leases' 26: volatile-ttl takes documents and
/// positions before the ballast, and the ballast before a lease, as a full node with a larger
/// catalogue (documents and positions of other products) would.
const BALLAST_TTL: Duration = Duration::from_secs(25 * 3600 + 600);

/// Where the ballast goes: the run's Redis, as the checker looks at it, and every node's port
/// for its eviction count.
pub struct Target {
    pub cluster: bool,
    pub url: String,
    pub nodes: Vec<String>,
    pub ports: Vec<u16>,
}

/// What the ballast did by the time the writers stopped.
pub struct Filled {
    pub written: u64,
    /// Keys every node evicted meanwhile (a restarted node's count starts again from 0).
    pub evicted: u64,
}

/// Fills every primary (`primaries` of them) with ballast until it has evicted, before the
/// run starts, so that the pressure is there from the first write. Returns the keys written.
pub async fn prefill(target: &Target, full: MemoryPressure, primaries: usize) -> u64 {
    let mut conn = look(target.cluster, &target.url, &target.nodes)
        .await
        .expect("a connection for the ballast");
    let value = "b".repeat(full.ballast_bytes);
    let mut written = 0u64;
    loop {
        let mut evicting = 0;
        for &port in &target.ports {
            if evicted_keys(port).await.unwrap_or(0) > 0 {
                evicting += 1;
            }
        }
        if evicting >= primaries {
            return written;
        }
        assert!(
            written < 10_000,
            "the ballast never made every primary evict"
        );
        for _ in 0..16 {
            let _: redis::RedisResult<()> = conn
                .set_ex(format!("prefill:{written}"), &value, BALLAST_TTL.as_secs())
                .await;
            written += 1;
        }
    }
}

/// Writes ballast until the writers stop, connecting again after a restart or a failover.
/// With [`MemoryPressure::hot_ballast`], every ballast key that can still be there (the
/// `prefilled` keys of [`prefill`] and the newest written since, as many as `maxmemory` holds)
/// is touched after each new one: under `volatile-lru` the product's keys a second idle are then
/// what the node evicts first, as volatile-ttl evicts them first for their nearer expiry.
pub async fn fill(
    target: Target,
    full: MemoryPressure,
    prefilled: u64,
    mut phase: watch::Receiver<Phase>,
) -> Filled {
    assert!(
        !(full.hot_ballast && target.cluster),
        "hot ballast is touched with one multi-key TOUCH, on one node"
    );
    let value = "b".repeat(full.ballast_bytes);
    let room = (full.maxmemory / full.ballast_bytes as u64) as usize + 1;
    let mut live: VecDeque<String> = (prefilled.saturating_sub(room as u64)..prefilled)
        .map(|n| format!("prefill:{n}"))
        .collect();
    let mut tick = tokio::time::interval(full.ballast_every);
    let mut conn: Option<Look> = None;
    let mut counts = HashMap::new();
    // The prefill's evictions (ballast alone) are not the run's.
    evicted_since(&target.ports, &mut counts).await;
    let mut filled = Filled {
        written: 0,
        evicted: 0,
    };
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = phase.wait_for(|p| *p != Phase::Running) => break,
        }
        if n % 10 == 0 {
            filled.evicted += evicted_since(&target.ports, &mut counts).await;
        }
        if conn.is_none() {
            conn = look(target.cluster, &target.url, &target.nodes).await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        // Refused while a node is down, or out of memory with nothing left to evict: the
        // ballast is not what the run checks.
        let key = format!("ballast:{n}");
        let set: redis::RedisResult<()> = c.set_ex(&key, &value, BALLAST_TTL.as_secs()).await;
        match set {
            Ok(()) if full.hot_ballast => {
                filled.written += 1;
                live.push_back(key);
                if live.len() > room {
                    live.pop_front();
                }
                let _: redis::RedisResult<u64> = redis::cmd("TOUCH")
                    .arg(live.as_slices().0)
                    .arg(live.as_slices().1)
                    .query_async(c)
                    .await;
            }
            Ok(()) => filled.written += 1,
            Err(e) if e.is_io_error() || e.is_connection_dropped() => conn = None,
            Err(_) => {}
        }
    }
    filled.evicted += evicted_since(&target.ports, &mut counts).await;
    filled
}

/// Keys evicted on the nodes at `ports` since the counts in `last`, which it updates; a count
/// that went down belongs to a node restarted since.
async fn evicted_since(ports: &[u16], last: &mut HashMap<u16, u64>) -> u64 {
    let mut total = 0;
    for &port in ports {
        let Some(now) = evicted_keys(port).await else {
            continue;
        };
        let before = last.insert(port, now).unwrap_or(0);
        total += if now >= before { now - before } else { now };
    }
    total
}

/// The node's `evicted_keys` (`INFO stats`), or `None` while it is down.
async fn evicted_keys(port: u16) -> Option<u64> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_millis(200),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    info_field(&mut conn, "stats", "evicted_keys").await
}

/// The channel a node announces its evictions on (keyspace notifications, `Ee`).
const EVICTED: &str = "__keyevent@0__:evicted";

/// The keys one node evicts from when it is made until [`EvictionWatch::stop`]: what a herd
/// under memory pressure is allowed to read the table again for.
pub struct EvictionWatch {
    admin: redis::aio::MultiplexedConnection,
    marker: String,
    task: tokio::task::JoinHandle<Vec<String>>,
}

/// Starts announcing the evictions of the node at `port` and listening to them.
pub async fn watch_evictions(port: u16) -> EvictionWatch {
    let mut admin = node_connection(port).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Ee")
        .query_async(&mut admin)
        .await
        .expect("keyspace notifications on");
    let mut pubsub = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_async_pubsub()
        .await
        .expect("a pub/sub connection");
    pubsub.subscribe(EVICTED).await.expect("subscribed");
    // Its own: a run-wide watch (`watch_run`) and a herd's can be on the same node at once.
    let marker = format!(
        "{MARKER}{}",
        WATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let end = marker.clone();
    let task = tokio::spawn(async move {
        let mut keys = Vec::new();
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let key: String = message.get_payload().unwrap_or_default();
            if key == end {
                break;
            }
            if !key.starts_with(MARKER) {
                keys.push(key);
            }
        }
        keys
    });
    EvictionWatch {
        admin,
        marker,
        task,
    }
}

/// Published last on the channel, with the watch's number: every eviction announced before it
/// has arrived once it has.
const MARKER: &str = "checker:end-of-watch:";

static WATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The product's keys a node evicted over a run, by kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProductEvictions {
    pub documents: u64,
    pub positions: u64,
    pub leases: u64,
}

impl ProductEvictions {
    /// Sorts evicted keys by what they are (`{product:x}:ver`, `{product:x}:lease`,
    /// `product:x`); the ballast is not counted.
    pub fn of(keys: &[String], prefix: &str) -> Self {
        let mut out = Self::default();
        let tagged = format!("{{{prefix}");
        for key in keys {
            if key.starts_with(&tagged) && key.ends_with("}:ver") {
                out.positions += 1;
            } else if key.starts_with(&tagged) && key.ends_with("}:lease") {
                out.leases += 1;
            } else if key.starts_with(prefix) {
                out.documents += 1;
            }
        }
        out
    }
}

impl EvictionWatch {
    /// The keys evicted since the watch began.
    pub async fn stop(mut self) -> Vec<String> {
        let _: () = redis::cmd("PUBLISH")
            .arg(EVICTED)
            .arg(&self.marker)
            .query_async(&mut self.admin)
            .await
            .expect("marker published");
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the marker arrives")
            .expect("watch task")
    }
}
