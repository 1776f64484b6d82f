//! The checks on the cache once the actors have stopped and the stream is drained: invariant 3
//! (every cached key equals the table or is absent, and on a cluster every replica holds what its
//! primary holds) and invariant 2 (every record once more from TRIM_HORIZON changes no cached
//! value). Invariant 1 is judged over the recorded history (`history.rs`), invariant 4 by each
//! herd (`chaos.rs`). The looks go through [`Look`]: one node, or every primary of a cluster.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use local_stack::services::Role;
use local_stack::stream::{lambda_event, Position};
use product_cache::config::CacheSettings;
use product_cache::document::Document;
use product_cache::id::{KeyType, ProductId};
use product_cache::store::ProductStore;
use redis::aio::ConnectionLike;
use serde_json::Value;

use super::feeder::FeedOutcome;
use super::history::{Clock, Nanos};
use super::system::{node_connection, Look, Sut};

/// Invariant 3, once nothing writes any more, over the items, the herds' keys and any other key
/// the cache holds. An undrained stream is a violation too: the comparison only holds once every
/// change was delivered.
pub async fn cache_matches_table(
    sut: &Sut,
    conn: &mut Look,
    items: &[String],
    herds: usize,
    feed: &FeedOutcome,
    writes: usize,
) -> Vec<String> {
    let store = sut.store();
    let mut inv3 = Vec::new();
    if !feed.drained {
        inv3.push(format!(
            "the stream was not drained: {} of {} writes acknowledged",
            feed.acks.len(),
            writes
        ));
    }
    let mut all_ids: BTreeSet<String> = items
        .iter()
        .cloned()
        .chain((0..herds).map(|h| format!("cold-{h}")))
        .collect();
    all_ids.extend(
        snapshot(conn)
            .await
            .into_keys()
            .map(|k| k["product:".len()..].to_owned()),
    );
    for id in all_ids {
        let key = format!("product:{id}");
        let cached: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await.unwrap();
        let item = store
            .get(&ProductId::parse(&id, KeyType::S).unwrap())
            .await
            .expect("GetItem");
        let want = match &item {
            Some(item) => Document::from_item(item).unwrap().into_string(),
            None => "null".to_owned(),
        };
        if let Some(cached) = cached {
            if cached != want {
                inv3.push(format!("{key}: cached {cached}, table has {want}"));
            }
        }
    }
    inv3
}

pub struct Replay {
    /// Violations of invariant 2.
    pub violations: Vec<String>,
    pub replayed: usize,
    /// `null`s that timed out during the replay, which are not its doing.
    pub expired: usize,
    /// Under memory pressure: documents the replay deleted, as it must where the node has
    /// evicted since its slot's epoch (a position may be gone). Never a value written.
    pub deleted: usize,
}

/// Invariant 2: replays the whole stream through a fresh invalidator with `settings` (the
/// run's last) and compares the cache before and after.
pub async fn replay_changes_nothing(
    sut: &Sut,
    settings: &CacheSettings,
    conn: &mut Look,
    clock: Clock,
    evicting: bool,
) -> Replay {
    let before_at = clock.now();
    let before = snapshot(conn).await;
    let replay = sut.invalidator(sut.cache(settings).await, settings);
    let mut seen = HashSet::new();
    let records: Vec<Value> = sut
        .stream
        .read_available(&Position::TrimHorizon)
        .await
        .expect("stream read")
        .into_iter()
        .filter(|r| seen.insert(r["eventID"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let replayed = records.len();
    for batch in records.chunks(100) {
        // A fresh client may still be connecting, and on a cluster a replica that rejoined late
        // may still be syncing (its `WAIT` then fails): delivered again, as Lambda would.
        let mut attempts = 0;
        loop {
            let response = replay.handle(lambda_event(batch.to_vec())).await;
            if response.batch_item_failures.is_empty() {
                break;
            }
            attempts += 1;
            assert!(attempts < 50, "the replay failed: {response:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let after = snapshot(conn).await;
    let mut inv2 = Vec::new();
    let mut expired = 0;
    let mut deleted = 0;
    for key in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let (was, is) = (before.get(key), after.get(key));
        match (was, is) {
            (Some(a), Some(b)) if a.0 == b.0 => {}
            // A short-lived `null` may time out during a long replay: not the replay's doing.
            (Some((_, Some(ttl))), None) if before_at + ttl.as_nanos() as Nanos <= clock.now() => {
                expired += 1;
            }
            (Some(_), None) if evicting => deleted += 1,
            _ => inv2.push(format!(
                "{key}: {:?} became {:?}",
                was.map(|w| &w.0),
                is.map(|i| &i.0)
            )),
        }
    }
    Replay {
        violations: inv2,
        replayed,
        expired,
        deleted,
    }
}

/// Every `product:*` key, its value and its time to live. `KEYS` (the checker's, not the
/// product's: a few thousand keys at most) because a cluster client sends it to every primary
/// and joins the answers, where `SCAN` would see one node.
async fn snapshot(
    conn: &mut (impl ConnectionLike + Send),
) -> BTreeMap<String, (String, Option<Duration>)> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("product:*")
        .query_async(conn)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let (value, ttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        if let Some(value) = value {
            let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
            out.insert(key, (value, ttl));
        }
    }
    out
}

/// Invariant 3 as replicas serve it: once replication has caught up (fills are not confirmed,
/// so replicas may trail by a moment), every replica holds the `product:*` values its primary
/// holds. Waits up to 10 s for that.
pub async fn replicas_match_primaries(roles: &[Role]) -> Vec<String> {
    let started = std::time::Instant::now();
    loop {
        let mut differences = Vec::new();
        for primary in roles.iter().filter(|r| r.primary && !r.failed) {
            let mut conn = node_connection(primary.port).await;
            let want: BTreeMap<String, String> = values(&mut conn).await;
            for replica in roles
                .iter()
                .filter(|r| r.replica_of == Some(primary.port) && !r.failed)
            {
                let mut conn = node_connection(replica.port).await;
                redis::cmd("READONLY")
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
                let have = values(&mut conn).await;
                for key in want.keys().chain(have.keys()).collect::<BTreeSet<_>>() {
                    if want.get(key) != have.get(key) {
                        differences.push(format!(
                            "{key}: replica :{} holds {:?}, its primary :{} {:?}",
                            replica.port,
                            have.get(key),
                            primary.port,
                            want.get(key)
                        ));
                    }
                }
            }
        }
        if differences.is_empty() || started.elapsed() > Duration::from_secs(10) {
            return differences;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `product:*` values of one node.
async fn values(conn: &mut (impl ConnectionLike + Send)) -> BTreeMap<String, String> {
    snapshot(conn)
        .await
        .into_iter()
        .map(|(k, (v, _))| (k, v))
        .collect()
}
