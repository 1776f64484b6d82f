//! Which node a key lives on, so that each call goes through that node's circuit breaker
//! (`breaker.rs`): the one node, or on a cluster the primary serving the key's hash slot, from a
//! slot map kept here.
//!
//! The cluster client routes by a slot map of its own, which it does not share; ours is
//! `CLUSTER SLOTS`, fetched in the background on first use, again when it is a minute old, and
//! soon after a call to some node failed (a failover or a node swap moves slots). Every batch
//! of the invalidator reads `CLUSTER SLOTS` anyway and leaves its answer here too. Until a map
//! is known (the first milliseconds after a cold start, or while no node answers `CLUSTER
//! SLOTS`), the cluster as a whole has one breaker: what a single node has.
//!
//! A map that is out of date only misplaces a call's outcome on the wrong breaker until the next
//! fetch; where each command goes is still the cluster client's business.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::{is_node_failure, BatchPermits};
use super::slots::slot_of;
use super::topology::{Conn, SlotMap};
use super::{CacheError, RedisCache};

/// A map older than this is fetched again at the next call.
const MAX_AGE: Duration = Duration::from_secs(60);
/// Between two fetches that are not for age: a node that fails every call does not cost a
/// `CLUSTER SLOTS` for each.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// The nodes of a cache, as far as breakers are concerned.
pub(super) enum Nodes {
    /// One node, by its address.
    Single(String),
    /// A cluster: its slot map when known, and the name of its breaker until then.
    Cluster { whole: String, map: SlotMapCache },
}

impl Nodes {
    /// The node at `(host, port)`.
    pub fn single((host, port): &(String, u16)) -> Self {
        Nodes::Single(format!("{host}:{port}"))
    }

    /// The cluster reached through `(host, port)`.
    pub fn cluster((host, port): &(String, u16)) -> Self {
        Nodes::Cluster {
            whole: format!("cluster {host}:{port}"),
            map: SlotMapCache::default(),
        }
    }

    /// The first primary of the slot map kept: a node to ask for the next map. None for a
    /// single node, or before the first map.
    pub fn first_primary(&self) -> Option<(String, u16)> {
        let Nodes::Cluster { map, .. } = self else {
            return None;
        };
        map.kept()?.first().map(|(_, _, node)| node.clone())
    }
}

/// A cluster's slot map as last fetched, and when to fetch it again.
#[derive(Default)]
pub(super) struct SlotMapCache {
    // A std Mutex: never held across an await.
    state: Mutex<MapState>,
}

#[derive(Default)]
struct MapState {
    map: Option<(Arc<SlotMap>, Instant)>,
    fetching: bool,
    last_attempt: Option<Instant>,
    /// A call failed since the last fetch: the map may have changed.
    suspect: bool,
}

impl SlotMapCache {
    /// The primary serving `slot`, by the map kept; `None` without one.
    fn node_of(&self, slot: u16) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (map, _) = state.map.as_ref()?;
        map.iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, (host, port))| format!("{host}:{port}"))
    }

    pub fn kept(&self) -> Option<Arc<SlotMap>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.map.as_ref().map(|(map, _)| Arc::clone(map))
    }

    pub fn store(&self, map: SlotMap) -> Arc<SlotMap> {
        let map = Arc::new(map);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.map = Some((Arc::clone(&map), Instant::now()));
        state.suspect = false;
        map
    }

    pub fn suspect(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).suspect = true;
    }

    /// Whether a fetch is due now (none known, too old, or suspect); if so it counts as
    /// started, and [`SlotMapCache::fetched`] must end it.
    fn start_fetch(&self) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.fetching {
            return false;
        }
        let old = state
            .map
            .as_ref()
            .is_some_and(|(_, at)| now.duration_since(*at) >= MAX_AGE);
        let retry = state
            .last_attempt
            .is_none_or(|at| now.duration_since(at) >= RETRY_AFTER);
        let due = old || (retry && (state.map.is_none() || state.suspect));
        if due {
            state.fetching = true;
            state.last_attempt = Some(now);
        }
        due
    }

    fn fetched(&self, map: Option<SlotMap>) {
        if let Some(map) = map {
            self.store(map);
        }
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fetching = false;
    }
}

/// A node's address (`host`, `port`) in a slot map, and the indexes of a batch's keys it serves.
type KeyGroup<'m> = (Option<&'m (String, u16)>, Vec<usize>);

/// The keys' indexes grouped by the primary `map` says serves their slot (`None`: no map, or
/// a slot it does not cover), in order of first appearance.
fn group_keys<'m>(keys: &[String], map: Option<&'m SlotMap>) -> Vec<KeyGroup<'m>> {
    let mut groups: Vec<KeyGroup<'m>> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let slot = slot_of(key);
        let node = map.and_then(|map| {
            map.iter()
                .find(|(start, end, _)| (*start..=*end).contains(&slot))
                .map(|(_, _, node)| node)
        });
        match groups.iter_mut().find(|(n, _)| *n == node) {
            Some((_, group)) => group.push(i),
            None => groups.push((node, vec![i])),
        }
    }
    groups
}

impl RedisCache {
    /// The name of the breaker guarding `key`'s node; on a cluster, starts a fetch of the slot
    /// map in the background when one is due.
    pub(super) fn node_of(&self, key: &str) -> String {
        match &*self.nodes {
            Nodes::Single(node) => node.clone(),
            Nodes::Cluster { whole, map } => {
                self.refresh_slot_map();
                map.node_of(slot_of(key)).unwrap_or_else(|| whole.clone())
            }
        }
    }

    /// The keys' indexes grouped by the name of their node's breaker (as [`Self::node_of`]
    /// names it), in order of first appearance. A batch looks at the slot map once, not once
    /// per key: on a 2-core machine the per-key lookups were a tenth of a batch hit's time.
    pub(super) fn group_by_node(&self, keys: &[String]) -> Vec<(String, Vec<usize>)> {
        let Nodes::Cluster { map, .. } = &*self.nodes else {
            return vec![(self.group_node(None), (0..keys.len()).collect())];
        };
        self.refresh_slot_map();
        let kept = map.kept();
        group_keys(keys, kept.as_deref())
            .into_iter()
            .map(|(node, group)| (self.group_node(node), group))
            .collect()
    }

    /// Whether `node` (a breaker's name) is the whole cluster's: keys with no node of their own
    /// yet, the slot map not known.
    pub(super) fn is_whole_cluster(&self, node: &str) -> bool {
        match &*self.nodes {
            Nodes::Single(_) => false,
            Nodes::Cluster { whole, .. } => node == whole,
        }
    }

    /// The name of the breaker guarding `key` (`host:port` of its node, or the whole cluster's
    /// until the slot map is known): for tests, which wait for the map before stalling a node.
    #[cfg(feature = "test-support")]
    pub fn breaker_node(&self, key: &str) -> String {
        self.node_of(key)
    }

    /// A background fetch of the slot map, if one is due.
    fn refresh_slot_map(&self) {
        let Nodes::Cluster { map, .. } = &*self.nodes else {
            return;
        };
        if !map.start_fetch() {
            return;
        }
        let this = self.clone();
        // In the background: the node it asks may be the one that stalled, and no caller should
        // wait for that.
        tokio::spawn(async move {
            let fetched = match this.conn().await {
                Ok(Conn::Cluster(mut conn)) => this.slot_map(&mut conn).await.ok(),
                _ => None,
            };
            if let Nodes::Cluster { map, .. } = &*this.nodes {
                map.fetched(fetched);
            }
        });
    }

    /// `call` for `key` through its node's breaker (see `breaker.rs`).
    pub(super) async fn guarded<T>(
        &self,
        key: &str,
        call: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        self.guarded_trial(key, call).await.0
    }

    /// [`guarded`](Self::guarded), also saying whether the call was its breaker's trial.
    ///
    /// **Fencing.** The trial's answer is the first from a node that had stopped answering,
    /// and it may come from a node that is no longer what it was: a primary stalled for longer
    /// than the cluster's node timeout has been replaced by its replica meanwhile, and when it
    /// goes on it answers the requests it held from its old data before the cluster bus tells it
    /// it was demoted. So the trial closes the breaker (the node answers) but its data is not
    /// served: a read's hit is answered from the table instead, and a batch must be confirmed by
    /// every replica configured, not only those attached (a demoted primary has none). By the
    /// next call the node has caught up with the cluster.
    pub(super) async fn guarded_trial<T>(
        &self,
        key: &str,
        call: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> (Result<T, CacheError>, bool) {
        self.guarded_trial_on(&self.node_of(key), call).await
    }

    /// [`guarded_trial`](Self::guarded_trial) through the breaker of `node`, named already (a
    /// batch's group).
    pub(super) async fn guarded_trial_on<T>(
        &self,
        node: &str,
        call: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> (Result<T, CacheError>, bool) {
        let (outcome, trial) = self.breakers.call(node, call).await;
        if let (Err(e), Nodes::Cluster { map, .. }) = (&outcome, &*self.nodes) {
            if is_node_failure(e) {
                map.suspect();
            }
        }
        (outcome, trial)
    }

    /// The breaker name of a batch's group bound for `node` (`None`: the one node, or a slot
    /// the map has no primary for).
    pub(super) fn group_node(&self, node: Option<&(String, u16)>) -> String {
        match (&*self.nodes, node) {
            (Nodes::Single(name), _) => name.clone(),
            (Nodes::Cluster { .. }, Some((host, port))) => format!("{host}:{port}"),
            (Nodes::Cluster { whole, .. }, None) => whole.clone(),
        }
    }

    /// A batch's admissions, made with the breakers of this cache.
    pub(super) fn batch_permits(&self) -> BatchPermits<'_> {
        BatchPermits::new(&self.breakers)
    }

    /// Ends a batch's admissions: each node's outcome to its breaker, and on a cluster where a
    /// node failed, the slot map marked for a fetch.
    pub(super) fn finish_batch(&self, permits: BatchPermits<'_>) {
        let failed = permits.finish();
        if let (true, Nodes::Cluster { map, .. }) = (failed, &*self.nodes) {
            map.suspect();
            self.refresh_slot_map();
        }
    }

    /// The slot map a batch groups its ops by: fresh from the cluster, as every batch reads it,
    /// unless a node's breaker is open, or `CLUSTER SLOTS` failed to reach the node it went to:
    /// then the one kept, if any. `CLUSTER SLOTS` may go to the stalled node, and waiting out
    /// its timeout would fail the whole batch where only that node's ops need to. A kept map that is out of date sends some ops to a node that no longer serves
    /// their slots: they fail (a redirection, a read-only replica) and are retried, as they
    /// would be had the map changed just after a fresh read.
    pub(super) async fn batch_slot_map(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) -> Result<Arc<SlotMap>, CacheError> {
        let Nodes::Cluster { map: kept, .. } = &*self.nodes else {
            return self.slot_map(conn).await.map(Arc::new);
        };
        if self.breakers.any_open() {
            if let Some(map) = kept.kept() {
                self.refresh_slot_map();
                return Ok(map);
            }
        }
        match self.slot_map(conn).await {
            Ok(map) => Ok(kept.store(map)),
            Err(e) if is_node_failure(&e) => {
                kept.suspect();
                kept.kept().ok_or(e)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> SlotMap {
        vec![
            (0, 5460, ("10.0.0.1".into(), 6379)),
            (5461, 10922, ("10.0.0.2".into(), 6379)),
            (10923, 16383, ("10.0.0.3".into(), 6379)),
        ]
    }

    #[test]
    fn a_slot_is_served_by_the_primary_of_its_range() {
        let cache = SlotMapCache::default();
        assert_eq!(cache.node_of(0), None);
        cache.store(map());
        assert_eq!(cache.node_of(0).as_deref(), Some("10.0.0.1:6379"));
        assert_eq!(cache.node_of(5461).as_deref(), Some("10.0.0.2:6379"));
        assert_eq!(cache.node_of(16383).as_deref(), Some("10.0.0.3:6379"));
    }

    #[test]
    fn a_batch_groups_its_keys_by_the_primary_of_each_slot() {
        let map = map();
        let keys: Vec<String> = (0..60).map(|i| format!("product:k{i}")).collect();
        let groups = group_keys(&keys, Some(&map));
        let cache = SlotMapCache::default();
        cache.store(map.clone());
        let mut seen = Vec::new();
        for (node, group) in &groups {
            let (host, port) = node.expect("the map covers every slot");
            for &i in group {
                assert_eq!(
                    cache.node_of(slot_of(&keys[i])),
                    Some(format!("{host}:{port}")),
                    "{} grouped with the wrong node",
                    keys[i]
                );
                seen.push(i);
            }
        }
        assert_eq!(groups.len(), 3, "60 keys fall on all three primaries");
        seen.sort_unstable();
        assert_eq!(seen, (0..60).collect::<Vec<_>>(), "every key in one group");
        assert_eq!(groups[0].1[0], 0, "groups in order of first appearance");

        let without = group_keys(&keys, None);
        assert_eq!(without.len(), 1);
        assert_eq!((without[0].0, without[0].1.len()), (None, 60));
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_are_due_when_unknown_old_or_suspect_one_at_a_time() {
        let cache = SlotMapCache::default();
        assert!(cache.start_fetch(), "no map yet");
        assert!(!cache.start_fetch(), "two fetches at once");
        cache.fetched(None);
        assert!(!cache.start_fetch(), "retried at once after a failed fetch");
        tokio::time::advance(RETRY_AFTER).await;
        assert!(cache.start_fetch());
        cache.fetched(Some(map()));
        tokio::time::advance(RETRY_AFTER).await;
        assert!(!cache.start_fetch(), "a fresh map fetched again");
        cache.suspect();
        assert!(cache.start_fetch(), "a failure did not call for a fetch");
        cache.fetched(Some(map()));
        tokio::time::advance(MAX_AGE).await;
        assert!(cache.start_fetch(), "an old map was kept");
    }
}
