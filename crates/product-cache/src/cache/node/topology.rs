//! Layer 1: which node serves a key, and when that view is fetched again.
//!
//! A single node serves every key. A cluster's view is its slot map (`CLUSTER SLOTS`: each slot
//! range's primary and replicas) and, with replica reads, which replicas each primary reports
//! attached and caught up (`INFO replication`). It is fetched in a background task, never on a
//! caller's path:
//! - at start (a caller that needs it before the first map arrives waits for it within its own
//!   budget, as for a connection still forming, and bypasses the cache if it does not come);
//! - when it is a minute old;
//! - soon after something said it may be wrong ([`Topology::mark_stale`]): a redirection
//!   (`MOVED`, `ASK`, `READONLY`, `CLUSTERDOWN`, `TRYAGAIN`), a node that could not be reached, or
//!   a call refused by a node's open breaker. So while a node's breaker is open the map is asked
//!   again every [`RETRY_AFTER`] of a node whose breaker is not, and once the cluster has
//!   promoted the stalled primary's replica, its slots go to the replica;
//! - with replica reads, the replicas' state every [`READERS_EVERY`].
//!
//! # Replica reads
//! A replica whose link to its primary dropped still answers reads from its old data
//! (`replica-serve-stale-data yes`, the default and what ElastiCache runs). So a hit goes to a
//! replica only if the shard's primary listed it, in an answer asked at most
//! [`READERS_MAX_AGE`] ago, as `state=online` (attached and streaming: it holds everything the
//! primary had acknowledged when it attached, and confirmation waits for it) with an
//! acknowledgement in the last second. Otherwise the hit goes to the primary. A replica that
//! missed a change the invalidator acknowledged was not online when it was acknowledged
//! (confirmation waited for every online replica), so no answer asked after the
//! acknowledgement lists it: it serves no hit from [`READERS_MAX_AGE`] after the
//! acknowledgement on. Inside that second a hit may still go to it, as to any replica that is
//! a little behind. An environment thawed after minutes finds its view too old, and reads from
//! primaries until the next answer.
//!
//! A replica Redis leaves out of `CLUSTER SLOTS` (it does while its replication offset is 0,
//! on a new, empty cluster) but its primary lists online makes the map stale: it is asked again
//! until the replica is in it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::breaker::Breakers;
use super::conn::{is_dead_connection, Pool};
use super::slot_map::{parse_cluster_slots, parse_replication, Replication, SlotMap};
use super::Addr;
use crate::cache::slots::slot_of;
use crate::cache::CacheError;

/// A map older than this is fetched again.
const MAX_AGE: Duration = Duration::from_secs(60);
/// Between two fetches that are not for age: a node that fails every call does not cost a
/// `CLUSTER SLOTS` for each.
pub(crate) const RETRY_AFTER: Duration = Duration::from_millis(250);
/// How often the primaries are asked which replicas they have, with replica reads.
pub(crate) const READERS_EVERY: Duration = Duration::from_millis(500);
/// A view of the replicas older than this is not used: hits go to the primaries.
pub(crate) const READERS_MAX_AGE: Duration = Duration::from_secs(1);
/// A replica whose last acknowledgement is older than this (seconds; replicas acknowledge every
/// second) is not read from: its link may be down while its primary still lists it.
const MAX_LAG_SECS: u64 = 1;
/// Bound on one question the view is built from (`CLUSTER SLOTS`, `INFO replication`), at
/// least: it is not on a caller's path, so a loaded machine's slow answer is waited for.
const ASK_AT_LEAST: Duration = Duration::from_millis(250);

/// What a call needs of the node it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The key's primary: scripts and writes.
    Primary,
    /// A replica of the key's shard that may serve reads (see the module's doc), else its
    /// primary. The primary itself without replica reads.
    Reader,
}

/// The one node, or a cluster.
#[derive(Clone)]
pub(crate) struct Topology {
    shared: Arc<Shared>,
}

struct Shared {
    kind: Kind,
    pool: Arc<Pool>,
    breakers: Arc<Breakers>,
    /// Bound on one of the view's questions (with [`ASK_AT_LEAST`]).
    timeout: Duration,
    /// Bound on waiting for a connection the view's question goes on.
    connect_wait: Duration,
    replica_reads: bool,
    /// Hits go only to replicas their primary reports attached and caught up (node-based);
    /// without it, to every replica the map names (a serverless cache's reader endpoint, whose
    /// reads AWS documents as eventually consistent, and which reports no replicas).
    verify_readers: bool,
    view: watch::Sender<Option<Arc<View>>>,
    // A std Mutex: held for a few instructions, never across an await.
    fetch: Mutex<FetchState>,
}

enum Kind {
    Single(Addr),
    /// Reached through `endpoint` (ElastiCache's configuration endpoint, or any node).
    Cluster {
        endpoint: Addr,
    },
}

#[derive(Default)]
struct FetchState {
    running: bool,
    last_attempt: Option<Instant>,
    /// Something said the map may be wrong since it was fetched.
    stale: bool,
}

/// A cluster as last fetched.
pub(crate) struct View {
    pub map: SlotMap,
    /// Per shard (as in `map.shards`): the replicas hits may go to.
    readers: Vec<Vec<Addr>>,
    /// When the primaries were asked for `readers` (when the questions went out).
    readers_asked: Option<Instant>,
    fetched: Instant,
}

impl Topology {
    pub fn single(addr: Addr, pool: Arc<Pool>, breakers: Arc<Breakers>) -> Self {
        pool.node(&addr);
        Self::with(
            Kind::Single(addr),
            pool,
            breakers,
            Duration::ZERO,
            Duration::ZERO,
            false,
            true,
        )
    }

    /// A cluster reached through `endpoint`; its first map is asked for now.
    pub fn cluster(
        endpoint: Addr,
        pool: Arc<Pool>,
        breakers: Arc<Breakers>,
        timeout: Duration,
        connect_wait: Duration,
        replica_reads: bool,
        verify_readers: bool,
    ) -> Self {
        pool.node(&endpoint);
        let topology = Self::with(
            Kind::Cluster { endpoint },
            pool,
            breakers,
            timeout,
            connect_wait,
            replica_reads,
            verify_readers,
        );
        topology.refresh_if_due();
        topology
    }

    fn with(
        kind: Kind,
        pool: Arc<Pool>,
        breakers: Arc<Breakers>,
        timeout: Duration,
        connect_wait: Duration,
        replica_reads: bool,
        verify_readers: bool,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                kind,
                pool,
                breakers,
                timeout,
                connect_wait,
                replica_reads,
                verify_readers,
                view: watch::Sender::new(None),
                fetch: Mutex::default(),
            }),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.shared.kind, Kind::Cluster { .. })
    }

    /// Where calls for `role` go now, without waiting: `None` on a cluster whose first map has
    /// not arrived. For tests.
    #[cfg(feature = "test-support")]
    pub fn router_now(&self, role: Role) -> Option<Router> {
        match &self.shared.kind {
            Kind::Single(addr) => Some(Router {
                at: At::Single(addr.clone()),
                role,
                pick: 0,
            }),
            Kind::Cluster { endpoint } => {
                let view = self.shared.view.borrow().clone()?;
                Some(self.cluster_router(view, endpoint.clone(), role))
            }
        }
    }

    fn cluster_router(&self, view: Arc<View>, endpoint: Addr, role: Role) -> Router {
        let fresh_readers = self.shared.replica_reads
            && (!self.shared.verify_readers
                || view
                    .readers_asked
                    .is_some_and(|at| at.elapsed() < READERS_MAX_AGE));
        Router {
            at: At::Cluster {
                view,
                endpoint,
                fresh_readers,
                topology: self.clone(),
            },
            role,
            pick: fastrand::usize(..),
        }
    }

    /// Where calls for `role` go now: on a cluster, the view as kept, waiting at most `wait`
    /// for the first one ([`CacheError::Connecting`] if it does not come).
    pub async fn router(&self, role: Role, wait: Duration) -> Result<Router, CacheError> {
        let endpoint = match &self.shared.kind {
            Kind::Single(addr) => {
                return Ok(Router {
                    at: At::Single(addr.clone()),
                    role,
                    pick: 0,
                })
            }
            Kind::Cluster { endpoint } => endpoint.clone(),
        };
        self.refresh_if_due();
        let kept = self.shared.view.borrow().clone();
        let view = match kept {
            Some(view) => view,
            None => {
                let mut rx = self.shared.view.subscribe();
                let first = tokio::time::timeout(wait, async {
                    loop {
                        // A failed first fetch (the node not up yet) is tried again meanwhile.
                        let retry = tokio::time::sleep(RETRY_AFTER);
                        tokio::select! {
                            view = rx.wait_for(Option::is_some) => break view.ok()?.clone(),
                            () = retry => self.refresh_if_due(),
                        }
                    }
                })
                .await;
                match first {
                    Ok(Some(view)) => view,
                    _ => return Err(CacheError::Connecting(wait)),
                }
            }
        };
        Ok(self.cluster_router(view, endpoint, role))
    }

    /// Something said the view may be wrong: it is fetched again soon, from a node whose
    /// breaker is not open.
    pub fn mark_stale(&self) {
        if !self.is_cluster() {
            return;
        }
        self.shared
            .fetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stale = true;
        self.refresh_if_due();
    }

    /// Waits at most `wait` for a view fetched from now on (marking the one kept stale): what a
    /// batch that met a redirection does before it answers, so that its retry finds the new
    /// map, and what a tool's call that met the old map does before it goes again. At once on
    /// a single node. A fetch is asked for again every [`RETRY_AFTER`] meanwhile: one asked
    /// for now may not start (the last began less than that ago) or may fail (the node it
    /// asked was the one lost).
    pub async fn refreshed(&self, wait: Duration) {
        if !self.is_cluster() {
            return;
        }
        let mut rx = self.shared.view.subscribe();
        self.mark_stale();
        let _ = tokio::time::timeout(wait, async {
            loop {
                tokio::select! {
                    changed = rx.changed() => match changed {
                        Ok(()) => break,
                        // The sender lives as long as `self`: never, but not a busy loop.
                        Err(_) => std::future::pending::<()>().await,
                    },
                    () = tokio::time::sleep(RETRY_AFTER) => self.mark_stale(),
                }
            }
        })
        .await;
    }

    /// Starts a fetch in the background if one is due.
    fn refresh_if_due(&self) {
        let Kind::Cluster { endpoint } = &self.shared.kind else {
            return;
        };
        let now = Instant::now();
        let view = self.shared.view.borrow().clone();
        let with_map = {
            let mut fetch = self.shared.fetch.lock().unwrap_or_else(|e| e.into_inner());
            if fetch.running {
                return;
            }
            let retry = fetch
                .last_attempt
                .is_none_or(|at| now.duration_since(at) >= RETRY_AFTER);
            let (map_due, readers_due) = match &view {
                None => (retry, false),
                Some(view) => (
                    now.duration_since(view.fetched) >= MAX_AGE || (retry && fetch.stale),
                    self.shared.replica_reads
                        && self.shared.verify_readers
                        && view
                            .readers_asked
                            .is_none_or(|at| now.duration_since(at) >= READERS_EVERY)
                        && retry,
                ),
            };
            if !map_due && !readers_due {
                return;
            }
            fetch.running = true;
            fetch.last_attempt = Some(now);
            if map_due {
                fetch.stale = false;
            }
            map_due
        };
        let (this, endpoint) = (self.clone(), endpoint.clone());
        // In the background: the node it asks may be the one that stalled, and no caller waits
        // for that.
        tokio::spawn(async move {
            let fetched = this.fetch(&endpoint, view, with_map).await;
            let mut fetch = this.shared.fetch.lock().unwrap_or_else(|e| e.into_inner());
            fetch.running = false;
            if !fetched {
                fetch.stale = true;
            }
        });
    }

    /// Builds a new view (the map asked again unless `with_map` is false and one is kept);
    /// whether it did.
    async fn fetch(&self, endpoint: &Addr, kept: Option<Arc<View>>, with_map: bool) -> bool {
        let asked = Instant::now();
        let (map, fetched) = match (&kept, with_map) {
            (Some(view), false) => (view.map.clone(), view.fetched),
            _ => match self.cluster_slots(endpoint, kept.as_deref()).await {
                Some(map) => (map, asked),
                None => return false,
            },
        };
        let (readers, readers_asked) = if self.shared.replica_reads && !self.shared.verify_readers {
            let every = map
                .shards
                .iter()
                .map(|s| s.replicas.iter().map(|r| r.addr.clone()).collect());
            (every.collect(), Some(asked))
        } else if self.shared.replica_reads {
            let (readers, stale) = self.readers(&map).await;
            if stale {
                self.shared
                    .fetch
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stale = true;
            }
            (readers, Some(asked))
        } else {
            (vec![Vec::new(); map.shards.len()], None)
        };
        // Replicas too, with or without replica reads: the replica a failover promotes is then
        // connected before its first call (a batch that follows a `MOVED` to it, the first
        // reads after the promotion).
        let mut nodes: HashSet<Addr> = map.nodes().cloned().collect();
        nodes.insert(endpoint.clone());
        // Connections and breakers follow the map: a node gone from it is closed and forgotten,
        // one new to it starts connecting before its first call.
        self.shared.pool.keep(&nodes);
        self.shared.breakers.keep(&nodes);
        self.shared.view.send_replace(Some(Arc::new(View {
            map,
            readers,
            readers_asked,
            fetched,
        })));
        true
    }

    /// `CLUSTER SLOTS`, asked of the nodes of the map kept whose breakers are not open
    /// (primaries first), then of the configured endpoint: never of a node known to be stalled,
    /// and so the map of a cluster that promoted a stalled primary's replica is learned from
    /// the others. The first answer wins.
    async fn cluster_slots(&self, endpoint: &Addr, kept: Option<&View>) -> Option<SlotMap> {
        let mut candidates: Vec<Addr> = Vec::new();
        if let Some(view) = kept {
            for node in view.map.nodes() {
                if !candidates.contains(node) && !self.shared.breakers.is_open(node) {
                    candidates.push(node.clone());
                }
            }
        }
        if !candidates.contains(endpoint) {
            candidates.push(endpoint.clone());
        }
        for node in candidates {
            let cmd = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
            let Ok(reply) = self.ask(&node, &cmd).await else {
                continue;
            };
            if let Ok(map) = parse_cluster_slots(&reply, &node.host) {
                if !map.shards.is_empty() {
                    return Some(map);
                }
            }
        }
        None
    }

    /// Per shard, the replicas hits may go to; also whether the map looks out of date (a
    /// primary that says it is not one, or lists an online replica the map lacks).
    async fn readers(&self, map: &SlotMap) -> (Vec<Vec<Addr>>, bool) {
        let answers = futures::future::join_all(map.shards.iter().map(|shard| async {
            if self.shared.breakers.is_open(&shard.primary) {
                return None;
            }
            let cmd = redis::cmd("INFO").arg("replication").to_owned();
            let reply = self.ask(&shard.primary, &cmd).await.ok()?;
            parse_replication(&reply).ok()
        }))
        .await;
        let mut stale = false;
        let readers = map
            .shards
            .iter()
            .zip(answers)
            .map(|(shard, answer)| {
                let Some(Replication { primary, replicas }) = answer else {
                    return Vec::new();
                };
                stale |= !primary;
                let attached = |replica: &super::slot_map::Replica| {
                    replicas.iter().find(|a| {
                        a.port == replica.addr.port
                            && (a.ip == replica.addr.host || Some(&a.ip) == replica.ip.as_ref())
                    })
                };
                let known = shard
                    .replicas
                    .iter()
                    .filter(|r| attached(r).is_some())
                    .count();
                stale |= replicas.iter().filter(|a| a.online).count() > known;
                shard
                    .replicas
                    .iter()
                    .filter(|r| attached(r).is_some_and(|a| a.online && a.lag <= MAX_LAG_SECS))
                    .map(|r| r.addr.clone())
                    .collect()
            })
            .collect();
        (readers, stale)
    }

    /// One question to one node, on its connection, bounded; once more on a connection found
    /// dead, since every question here is a read.
    async fn ask(&self, node: &Addr, cmd: &redis::Cmd) -> Result<redis::Value, CacheError> {
        let conn = self.shared.pool.node(node);
        let bound = self.shared.timeout.saturating_mul(2).max(ASK_AT_LEAST);
        for _ in 0..2 {
            let mut current = conn.get(self.shared.connect_wait).await?;
            match tokio::time::timeout(bound, current.conn.send_packed_command(cmd)).await {
                Err(_) => return Err(CacheError::Timeout(bound)),
                Ok(Ok(reply)) => return Ok(reply.extract_error()?),
                Ok(Err(e)) if is_dead_connection(&e) => conn.discard(&current),
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        Err(CacheError::Unexpected(format!(
            "{node}: connection lost twice"
        )))
    }
}

/// Where calls for one role go, from one view: so that a batch's keys are grouped by one map.
pub(crate) struct Router {
    at: At,
    role: Role,
    /// Which attached replica of a shard this router sends to (every key of a shard to the same
    /// one, so they share a pipeline), chosen at random per router.
    pick: usize,
}

enum At {
    Single(Addr),
    Cluster {
        view: Arc<View>,
        endpoint: Addr,
        fresh_readers: bool,
        topology: Topology,
    },
}

impl Router {
    /// The node `key` goes to.
    pub fn node_of(&self, key: &str) -> Addr {
        match &self.at {
            At::Single(addr) => addr.clone(),
            At::Cluster { .. } => self.node_of_slot(slot_of(key)),
        }
    }

    /// The node serving `slot`. A slot no shard serves (its primary unknown) goes to the
    /// configured endpoint, which answers it or redirects it, and the map is asked again.
    pub fn node_of_slot(&self, slot: u16) -> Addr {
        match &self.at {
            At::Single(addr) => addr.clone(),
            At::Cluster { view, .. } => match view.map.shard_of(slot) {
                Some(shard) => self.node_of_shard(shard),
                None => self.unserved(),
            },
        }
    }

    /// The node calls for `role` go to in shard `shard` of the view: for reads, one of its
    /// attached replicas whose breaker is not open (the same one for every key of the shard),
    /// else its primary.
    fn node_of_shard(&self, shard: usize) -> Addr {
        let At::Cluster {
            view,
            fresh_readers,
            topology,
            ..
        } = &self.at
        else {
            unreachable!("a single node has no shards");
        };
        let readers = &view.readers[shard];
        if self.role == Role::Reader && *fresh_readers && !readers.is_empty() {
            let breakers = &topology.shared.breakers;
            let first = (self.pick + shard) % readers.len();
            let usable = (0..readers.len())
                .map(|i| &readers[(first + i) % readers.len()])
                .find(|r| !breakers.is_open(r));
            if let Some(reader) = usable {
                return reader.clone();
            }
        }
        view.map.shards[shard].primary.clone()
    }

    fn unserved(&self) -> Addr {
        let At::Cluster {
            endpoint, topology, ..
        } = &self.at
        else {
            unreachable!("a single node serves every slot");
        };
        topology.mark_stale();
        endpoint.clone()
    }

    /// `keys`' indexes grouped by the node each goes to, in order of first appearance.
    pub fn group<K: AsRef<str>>(&self, keys: &[K]) -> Vec<(Addr, Vec<usize>)> {
        let view = match &self.at {
            At::Single(addr) => return vec![(addr.clone(), (0..keys.len()).collect())],
            At::Cluster { view, .. } => view,
        };
        // A shard's node chosen once per batch, not once per key.
        let mut chosen: Vec<Option<Addr>> = vec![None; view.map.shards.len()];
        let mut groups: Vec<(Addr, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let node = match view.map.shard_of(slot_of(key.as_ref())) {
                Some(shard) => chosen[shard]
                    .get_or_insert_with(|| self.node_of_shard(shard))
                    .clone(),
                None => self.unserved(),
            };
            match groups.iter_mut().find(|(n, _)| *n == node) {
                Some((_, group)) => group.push(i),
                None => groups.push((node, vec![i])),
            }
        }
        groups
    }

    /// Every primary (the one node on a single node).
    pub fn primaries(&self) -> Vec<Addr> {
        match &self.at {
            At::Single(addr) => vec![addr.clone()],
            At::Cluster { view, .. } => view.map.primaries().cloned().collect(),
        }
    }
}
