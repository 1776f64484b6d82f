//! Issue 20: a full cache never brings an old price back. A real `redis-server` with the
//! template's eviction policy (`volatile-ttl`, `maxmemory-samples` 5) and a small `maxmemory`,
//! the functions' least-privilege user, the invalidator in refresh mode: Redis evicts among a
//! few sampled keys the one nearest its expiry, usually a document (one hour) but sometimes a
//! position (25 hours) whose document stays, and then an older change delivered again (Lambda
//! delivers at least once) must not write its older document back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use local_stack::services::{Engine, RedisServer};
use product_cache::cache::{version_key, Guards, RedisCache};
use product_cache::config::{CacheSettings, InvalidationMode::Refresh};
use product_cache::invalidate::Invalidator;
use serde_json::{json, Value};

use crate::support::{applied, fixture, info_field, redis_cache};

/// The issue's reproduction: 4,000 items of ~1 KB documents in 3 MB.
pub(crate) const ITEMS: usize = 4_000;
const USER: &str = "product-cache";
const PASSWORD: &str = "eviction-test";

/// A node running `engine`'s server with the template's policy, whose functions' user has
/// exactly docs/deploying.md's rules (the script's `INFO stats` needs `+info|stats`), declared empty
/// (its 16,384 epoch keys, which have no TTL and are never evicted, take about 1.5 MB), and then
/// given `room` bytes more than it uses.
async fn full_node(engine: Engine, room: u64) -> RedisServer {
    let rules = product_cache::acl::rules(&CacheSettings::default().key_prefix);
    let password = format!(">{PASSWORD}");
    let mut args = vec![
        "--maxmemory-policy",
        "volatile-ttl",
        "--user",
        USER,
        "on",
        &password,
    ];
    args.extend(rules.split_whitespace());
    if engine == Engine::Valkey {
        // Valkey 8.1 samples its keys differently (its own hash table): at the default 5 a
        // sample of positions alone was rarer, and runs separated 0 to 8 documents from their
        // positions (none in 3 of 11), short of the issue's state. A coarser sample (the
        // template leaves the engine's default) separated 7 to 15 in every run.
        args.extend(["--maxmemory-samples", "3"]);
    }
    let redis = RedisServer::start_engine(engine, &args)
        .await
        .expect("the node starts");
    // A Redis this test started empty: refreshes write from the first record.
    let cache = functions_cache(&redis, Guards::default()).await;
    crate::support::declared_empty(&cache).await;
    let mut conn = admin(&redis).await;
    let used = info_field(&mut conn, "memory", "used_memory")
        .await
        .expect("INFO memory has used_memory");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + room)
        .query_async(&mut conn)
        .await
        .unwrap();
    redis
}

/// The issue's 3 MB node, less what Redis itself uses.
pub(crate) const ROOM: u64 = 2 * 1024 * 1024;

async fn functions_cache(redis: &RedisServer, guards: Guards) -> RedisCache {
    let url = redis
        .url()
        .replacen("redis://", &format!("redis://{USER}:{PASSWORD}@"), 1);
    redis_cache(&url, &settings(guards)).await
}

fn settings(guards: Guards) -> CacheSettings {
    CacheSettings {
        guards,
        ..CacheSettings::default()
    }
}

/// An admin's connection (the default user), to look at what the functions left.
async fn admin(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub(crate) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Item `item`'s MODIFY to price `version`, created at `created` (epoch seconds), its sequence
/// number ordered by version first, its document about 1 KB.
pub(crate) fn record(item: usize, version: u64, created: f64) -> Value {
    let mut r = fixture("modify.json")["Records"][0].clone();
    let id = json!({"S": format!("p{item}")});
    let d = &mut r["dynamodb"];
    d["Keys"]["productId"] = id.clone();
    d["NewImage"]["productId"] = id;
    d["NewImage"]["price"] = json!({"N": version.to_string()});
    d["NewImage"]["description"] = json!({"S": "x".repeat(800)});
    d["SequenceNumber"] = json!(format!("{}", version * 100_000_000 + item as u64));
    d["ApproximateCreationDateTime"] = json!(created);
    r
}

/// Delivers `records` in Lambda's default batches of 100, each as Lambda does with
/// `ReportBatchItemFailures` (`support::applied`: a node busy evicting can outlast the 100 ms
/// timeout on a loaded machine); every batch must be acknowledged.
pub(crate) async fn deliver(invalidator: &Invalidator<RedisCache>, records: Vec<Value>) {
    for batch in records.chunks(100) {
        applied(invalidator, json!({ "Records": batch })).await;
    }
}

async fn evicted_keys(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    info_field(conn, "stats", "evicted_keys")
        .await
        .expect("INFO stats has evicted_keys")
}

/// Each cached item's price, and whether its position is still there.
pub(crate) async fn cached(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Vec<(usize, u64, bool)> {
    let mut found = Vec::new();
    for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("product:p{i}")).collect();
        let vers: Vec<String> = keys.iter().map(|k| version_key(k)).collect();
        let docs: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(conn)
            .await
            .unwrap();
        let positions: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&vers)
            .query_async(conn)
            .await
            .unwrap();
        for ((item, doc), position) in chunk.iter().zip(docs).zip(positions) {
            if let Some(doc) = doc {
                let doc: Value = serde_json::from_str(&doc).unwrap();
                let price = doc["price"].as_u64().expect("a price");
                found.push((*item, price, position.is_some()));
            }
        }
    }
    found
}

pub(crate) struct Outcome {
    /// Documents cached at the newer price before the older records came again.
    pub newer_cached: usize,
    /// Of those, how many had lost their position to eviction (the document stayed).
    pub without_position: usize,
    /// Documents at the older price after the older records came again.
    pub older_after: usize,
    pub evicted: u64,
}

/// Every item refreshed to price 1 and then to price 2 through a full node; then the price-1
/// record of every item cached at price 2 delivered again, on a node running `engine`'s server.
async fn redeliver_older_changes_after_evictions(engine: Engine, guards: Guards) -> Outcome {
    let redis = full_node(engine, ROOM).await;
    let cache = functions_cache(&redis, guards).await;
    let invalidator = Invalidator::new(cache, Refresh, settings(guards));
    let mut conn = admin(&redis).await;
    let outcome = redeliver_older_changes(&invalidator, &mut conn).await;
    eprintln!(
        "{engine:?}, {guards:?}: {} keys evicted, {} documents at the newer price ({} without \
         their position), {} at the older price after the older records came again",
        outcome.evicted, outcome.newer_cached, outcome.without_position, outcome.older_after
    );
    outcome
}

/// The scenario on a full cache whose node `conn` reaches: every item refreshed to price 1 and
/// then to price 2 through `invalidator`, then the price-1 record of every item cached at price
/// 2 delivered again.
pub(crate) async fn redeliver_older_changes(
    invalidator: &Invalidator<RedisCache>,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Outcome {
    let t0 = now_secs();
    // The older changes were made a minute ago; the newer ones are dated a minute ahead, so
    // that while the node evicts throughout they still refresh (a record created after its
    // slot's epoch does) and the cache ends holding newer documents, some of them without
    // their positions: the state the issue found.
    deliver(
        invalidator,
        (0..ITEMS).map(|i| record(i, 1, t0 - 60.0)).collect(),
    )
    .await;
    deliver(
        invalidator,
        (0..ITEMS).map(|i| record(i, 2, t0 + 60.0)).collect(),
    )
    .await;
    let before = cached(conn).await;
    let newer: Vec<usize> = before
        .iter()
        .filter(|(_, price, _)| *price == 2)
        .map(|(item, _, _)| *item)
        .collect();
    let without_position = before.iter().filter(|(_, _, kept)| !kept).count();
    // At least once (a retried or bisected batch, one that timed out after it had applied).
    deliver(
        invalidator,
        newer.iter().map(|&i| record(i, 1, t0 - 60.0)).collect(),
    )
    .await;
    let after = cached(conn).await;
    Outcome {
        newer_cached: newer.len(),
        without_position,
        older_after: after.iter().filter(|(_, price, _)| *price == 1).count(),
        evicted: evicted_keys(conn).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_change_delivered_again_after_evictions_never_writes_back() {
    older_changes_never_write_back_after_evictions_on(Engine::Redis).await;
}

/// The issue's reproduction with the eviction guard on, on a node running `engine`'s server:
/// thousands of keys evicted, documents separated from their positions, and not one older
/// document written back.
pub(crate) async fn older_changes_never_write_back_after_evictions_on(engine: Engine) {
    let outcome = redeliver_older_changes_after_evictions(engine, Guards::default()).await;
    // The issue's conditions: thousands of keys evicted, hundreds of documents left, and some
    // of them separated from their positions.
    assert!(outcome.evicted > 1_000, "{} evicted", outcome.evicted);
    assert!(
        outcome.newer_cached > 200,
        "{} newer documents cached",
        outcome.newer_cached
    );
    assert!(
        outcome.without_position > 0,
        "no document lost its position to eviction: the test did not reach the issue's state"
    );
    assert_eq!(
        outcome.older_after, 0,
        "{} of {} documents went back to the older price",
        outcome.older_after, outcome.newer_cached
    );
}

/// The guard off (evictions not watched): the issue's finding, reproduced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_eviction_guard_older_prices_come_back() {
    let outcome = redeliver_older_changes_after_evictions(
        Engine::Redis,
        Guards {
            evictions: false,
            ..Guards::default()
        },
    )
    .await;
    assert!(outcome.without_position > 0);
    assert!(
        outcome.older_after > 0,
        "no older price came back with the guard off ({} documents without their position)",
        outcome.without_position
    );
}

/// While the node evicts, a refresh from a record made now deletes (one miss, never stale); a
/// record made after the clock margin past the node's last eviction refreshes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_delete_while_the_node_evicts_and_resume_after() {
    refreshes_delete_while_the_node_evicts_on(Engine::Redis).await;
}

/// [`refreshes_delete_while_the_node_evicts_and_resume_after`] on a node running `engine`'s
/// server.
pub(crate) async fn refreshes_delete_while_the_node_evicts_on(engine: Engine) {
    let redis = full_node(engine, ROOM).await;
    let cache = functions_cache(&redis, Guards::default()).await;
    let invalidator = Invalidator::new(cache, Refresh, settings(Guards::default()));
    let mut conn = admin(&redis).await;
    let t0 = now_secs();
    // Item 0 first, so its document and position are there before the node fills up.
    deliver(&invalidator, vec![record(0, 1, t0)]).await;
    assert_eq!(cached(&mut conn).await[0].1, 1);
    // Fill the node with the other items.
    deliver(&invalidator, (1..ITEMS).map(|i| record(i, 1, t0)).collect()).await;
    let evicted = evicted_keys(&mut conn).await;
    assert!(evicted > 0, "the node never filled up");
    // Ballast evicts again, whatever is nearest its expiry. Item 0's next change, made now:
    // the node has evicted since its slot's epoch, so it deletes even though its position may
    // still be there.
    let _: () = redis::cmd("SET")
        .arg("ballast")
        .arg("b".repeat(200_000))
        .arg("EX")
        .arg(7200)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(evicted_keys(&mut conn).await > evicted);
    let now = now_secs();
    deliver(&invalidator, vec![record(0, 2, now)]).await;
    let item0 = || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("GET")
                .arg("product:p0")
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(item0().await, None, "refreshed while the node evicts");
    // A change made past the margin (2 s) after that batch's epoch refreshes again. It is dated
    // ahead rather than waited for.
    let margin = CacheSettings::default().clock_margin;
    let later = now + (margin + Duration::from_secs(1)).as_secs_f64();
    deliver(&invalidator, vec![record(0, 3, later)]).await;
    let doc: Value = serde_json::from_str(&item0().await.expect("refreshed")).unwrap();
    assert_eq!(doc["price"], json!(3));
}

/// A lease is evicted last, but it can be (a node holding nothing else with a nearer expiry):
/// its holder's fill is then refused, as after any lapse, and the next reader takes a lease of
/// its own. The lease's key is evicted for real here: ballast that outlives it fills the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_whose_lease_was_evicted_is_refused() {
    use product_cache::cache::{lease_key, Cache, Fill, Probe};

    let redis = full_node(Engine::Redis, 256 * 1024).await;
    let cache = functions_cache(&redis, Guards::default()).await;
    let mut conn = admin(&redis).await;
    let lease = Duration::from_secs(30);
    assert_eq!(
        cache.probe("product:p0", "first", lease).await.unwrap(),
        Probe::Lease
    );
    // Ballast with a TTL past the lease key's 26 hours, until the lease is the one evicted.
    for n in 0.. {
        let held: bool = redis::cmd("EXISTS")
            .arg(lease_key("product:p0"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !held {
            break;
        }
        assert!(n < 1_000, "the lease was never evicted");
        let _: () = redis::cmd("SET")
            .arg(format!("ballast:{n}"))
            .arg("b".repeat(16 * 1024))
            .arg("EX")
            .arg(48 * 3600)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let fill = |token: &str| Fill {
        key: "product:p0".into(),
        token: token.into(),
        value: r#"{"productId":"p0","price":1}"#.into(),
        ttl: Duration::from_secs(3600),
        order: None,
    };
    assert!(
        !cache.fill(fill("first")).await.unwrap(),
        "a fill was written without its lease"
    );
    // The node is still full: the next write would evict the nearest expiry again, which may
    // be the next reader's new lease. The limit lifted, that reader's lease and fill stand.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        cache.probe("product:p0", "second", lease).await.unwrap(),
        Probe::Lease
    );
    assert!(cache.fill(fill("second")).await.unwrap());
}
