//! The races the guards exist for, staged one at a time against a real Redis and the local
//! table's real stream. Each test also runs with its guard switched off and shows the fault, so
//! a test that passes cannot be one that would pass anyway.

use std::sync::Mutex;
use std::time::Duration;

use product_cache::cache::{Guards, RedisCache};
use product_cache::config::{AwsTimeouts, CacheSettings, InvalidationMode, InvalidationMode::*};
use product_cache::id::ProductId;
use product_cache::read::{CacheStatus, Lookup, ReadPath};
use product_cache::store::{DynamoStore, Item, ProductStore, StoreError};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::support::{dynamo_store_with, Counting, TestEnv};

const NO_LEASES: Guards = Guards {
    leases: false,
    ordering: true,
    evictions: true,
};
const NO_ORDERING: Guards = Guards {
    leases: true,
    ordering: false,
    evictions: true,
};

/// A store whose first read pauses after reading the table until the test releases it: the
/// reader has the old item in hand while the test changes the table.
struct GatedStore {
    inner: DynamoStore,
    read_done: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

impl ProductStore for GatedStore {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        let result = self.inner.get(id).await;
        let read_done = self.read_done.lock().unwrap().take();
        if let Some(read_done) = read_done {
            let release = self.release.lock().unwrap().take().unwrap();
            read_done.send(()).unwrap();
            release.await.unwrap();
        }
        result
    }
}

struct Gate {
    read_done: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

async fn gated_read_path(
    env: &TestEnv,
    settings: CacheSettings,
) -> (ReadPath<RedisCache, GatedStore>, Gate) {
    let (done_tx, done_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel();
    let store = GatedStore {
        inner: env.store(&settings),
        read_done: Mutex::new(Some(done_tx)),
        release: Mutex::new(Some(release_rx)),
    };
    let cache = env.cache(&settings).await;
    (
        ReadPath::new(cache, store, settings),
        Gate {
            read_done: done_rx,
            release: release_tx,
        },
    )
}

fn price_of(cached: Option<String>) -> Option<Value> {
    cached.map(|c| serde_json::from_str::<Value>(&c).unwrap()["price"].clone())
}

async fn update_price(env: &TestEnv, id: &str, price: &str) {
    env.put_product(id, price).await;
}

/// The stale-fill race of consistency.md: a reader reads version 1, the item changes and the
/// invalidation runs, then the reader's fill lands.
async fn stale_fill_race(mode: InvalidationMode, guards: Guards) -> Option<Value> {
    let mut env = TestEnv::new(mode).await;
    env.put_product("kb-001", "129.99").await;
    env.drain_stream().await;
    // Start cold, so the reader misses (refresh mode would have cached the INSERT).
    env.flush().await;
    let settings = CacheSettings {
        guards,
        ..CacheSettings::default()
    };
    let (read, gate) = gated_read_path(&env, settings).await;

    let reader = async {
        let (status, lookup) = read.get("kb-001").await;
        assert_eq!(status, CacheStatus::Miss);
        // The reader itself answers with what it read; the question is what it leaves behind.
        assert!(matches!(lookup.unwrap(), Lookup::Found(_)));
    };
    let writer = async {
        gate.read_done.await.unwrap();
        update_price(&env, "kb-001", "99.99").await;
        assert_eq!(env.drain_stream().await, 1);
        gate.release.send(()).unwrap();
    };
    tokio::join!(reader, writer);
    price_of(env.raw_get("product:kb-001").await)
}

#[tokio::test]
async fn a_fill_that_raced_an_invalidation_is_refused() {
    assert_eq!(stale_fill_race(Delete, Guards::default()).await, None);
    assert_eq!(
        stale_fill_race(Refresh, Guards::default()).await,
        Some(json!(99.99))
    );
    // Without leases the old price is written over the invalidation and stays for the TTL.
    assert_eq!(
        stale_fill_race(Delete, NO_LEASES).await,
        Some(json!(129.99))
    );
    assert_eq!(
        stale_fill_race(Refresh, NO_LEASES).await,
        Some(json!(129.99))
    );
}

#[tokio::test]
async fn a_fill_that_outlived_its_lease_is_refused() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let settings = CacheSettings {
        lease: Duration::from_millis(50),
        ..CacheSettings::default()
    };
    let (read, gate) = gated_read_path(&env, settings).await;
    let reader = read.get("kb-001");
    let slow_table = async {
        gate.read_done.await.unwrap();
        // Model a GetItem slower than the lease; the lease lapsing (its expiry, in its value,
        // passed by the node's clock) is what is awaited.
        let mut conn = env.redis_conn().await;
        loop {
            let lease: Option<String> = redis::cmd("GET")
                .arg("{product:kb-001}:lease")
                .query_async(&mut conn)
                .await
                .unwrap();
            let (secs, micros): (u64, u64) =
                redis::cmd("TIME").query_async(&mut conn).await.unwrap();
            let now_ms = secs * 1000 + micros / 1000;
            let expiry = lease
                .as_deref()
                .and_then(|l| l.split_once(':'))
                .and_then(|(e, _)| e.parse::<u64>().ok());
            if expiry.is_none_or(|e| e <= now_ms) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gate.release.send(()).unwrap();
    };
    let ((status, _), ()) = tokio::join!(reader, slow_table);
    assert_eq!(status, CacheStatus::Miss);
    // Someone else may own the key by now: a fill without a live lease never lands.
    assert_eq!(env.raw_get("product:kb-001").await, None);
}

/// 1,000 concurrent reads of one cold key, spread over four read-path instances (as four Lambda
/// environments would be) that share only Redis and the table. Returns the table reads made.
async fn stampede(guards: Guards, readers: usize) -> (usize, Vec<CacheStatus>) {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    // A lease period long enough for one GetItem even on a loaded 2-core CI machine: the test
    // counts reads per lease period, it does not time them.
    let settings = CacheSettings {
        guards,
        lease: Duration::from_secs(10),
        lease_wait: Duration::from_secs(10),
        redis_timeout: Duration::from_secs(2),
        ..CacheSettings::default()
    };
    let table_reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Its one GetItem, too, has time to spare: the shared moto server answers slowly beside a
    // checker run on a loaded machine (a clean-clone CI run saw it miss the 1 s attempt timeout
    // and its retries), and a reader whose lease holder failed reads the table itself.
    let table_timeouts = AwsTimeouts {
        attempt: Duration::from_secs(10),
        operation: Duration::from_secs(20),
    };
    let instances: Vec<_> = (0..4)
        .map(|_| {
            let store = dynamo_store_with(&env.sdk, &env.table, &settings, table_timeouts);
            let mut store = Counting::new(store);
            store.calls = table_reads.clone();
            async { ReadPath::new(env.cache(&settings).await, store, settings.clone()) }
        })
        .collect();
    let instances = futures::future::join_all(instances).await;
    let results =
        futures::future::join_all((0..readers).map(|i| instances[i % 4].get("kb-001"))).await;
    let mut statuses = Vec::new();
    for (status, lookup) in results {
        match lookup.unwrap() {
            Lookup::Found(doc) => assert!(doc.as_str().contains("129.99")),
            Lookup::NotFound => panic!("the item exists"),
        }
        statuses.push(status);
    }
    (
        table_reads.load(std::sync::atomic::Ordering::SeqCst),
        statuses,
    )
}

#[tokio::test]
async fn a_thousand_concurrent_cold_reads_cost_one_get_item() {
    let (reads, statuses) = stampede(Guards::default(), 1000).await;
    assert_eq!(reads, 1);
    let misses = statuses.iter().filter(|s| **s == CacheStatus::Miss).count();
    assert_eq!(misses, 1, "the others waited for the fill and hit");
    // Without leases every concurrent miss reads the table (200 readers are enough to show it).
    let (reads, _) = stampede(NO_LEASES, 200).await;
    assert!(reads > 20, "only {reads} reads without leases");
}

/// Applies the stream's INSERT and MODIFY in order, then `replay` (indexes into them) again.
async fn replay_after(mode: InvalidationMode, guards: Guards, replay: &[usize]) -> Option<String> {
    let mut env = TestEnv::new(mode).await;
    // Records and Redis share this machine's clock.
    let settings = CacheSettings {
        clock_margin: Duration::ZERO,
        redis_timeout: Duration::from_millis(500),
        guards,
        ..CacheSettings::default()
    };
    let invalidator =
        product_cache::invalidate::Invalidator::new(env.cache(&settings).await, mode, settings);
    env.put_product("kb-001", "129.99").await;
    update_price(&env, "kb-001", "99.99").await;
    let event = env.new_stream_event().await;
    let records = event["Records"].as_array().unwrap().clone();
    assert_eq!(records.len(), 2);
    let r = invalidator.handle(event).await;
    assert!(r.batch_item_failures.is_empty());
    if mode == Delete {
        // Fill the current version so there is something a stray delete could remove.
        assert_eq!(env.http_get("kb-001").await.1, "miss");
    }
    let before = env.raw_get("product:kb-001").await;
    let again: Vec<Value> = replay.iter().map(|&i| records[i].clone()).collect();
    let r = invalidator.handle(json!({ "Records": again })).await;
    assert!(r.batch_item_failures.is_empty());
    let after = env.raw_get("product:kb-001").await;
    assert!(before.is_some());
    (after != before).then_some(after.unwrap_or_else(|| "<deleted>".into()))
}

#[tokio::test]
async fn an_older_or_repeated_record_changes_nothing() {
    for mode in [Delete, Refresh] {
        for replay in [&[0][..], &[1], &[0, 1], &[1, 0]] {
            assert_eq!(
                replay_after(mode, Guards::default(), replay).await,
                None,
                "{mode:?} replay {replay:?} changed the cache"
            );
        }
    }
    // Without ordering, the older INSERT puts the old price back.
    let changed = replay_after(Refresh, NO_ORDERING, &[0]).await.unwrap();
    assert!(changed.contains("129.99"), "{changed}");
}

#[tokio::test]
async fn a_remove_sticks() {
    let mut env = TestEnv::new(Refresh).await;
    env.put_product("kb-001", "129.99").await;
    update_price(&env, "kb-001", "99.99").await;
    env.delete_product("kb-001").await;
    let event = env.new_stream_event().await;
    let records = event["Records"].as_array().unwrap().clone();
    let names: Vec<_> = records
        .iter()
        .map(|r| r["eventName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["INSERT", "MODIFY", "REMOVE"]);
    env.invalidator.handle(event).await;
    assert_eq!(env.raw_get("product:kb-001").await, None);

    // The MODIFY delivered again (a retry, a bisected batch) cannot resurrect the item.
    env.invalidator
        .handle(json!({ "Records": [records[1].clone()] }))
        .await;
    assert_eq!(env.raw_get("product:kb-001").await, None);
    assert_eq!(env.http_get("kb-001").await.0, 404);
}

async fn put_versioned(env: &TestEnv, version: &str, price: &str) {
    env.put_json(json!({
        "productId": {"S": "kb-001"}, "version": {"N": version}, "price": {"N": price}
    }))
    .await;
}

#[tokio::test]
async fn a_version_attribute_orders_fills_too() {
    // Leases off, so only the version check stands between the stale fill and the cache.
    let settings = CacheSettings {
        version_attribute: Some("version".into()),
        guards: NO_LEASES,
        ..CacheSettings::default()
    };
    let mut env = TestEnv::with_settings(Refresh, settings.clone()).await;
    put_versioned(&env, "1", "129.99").await;
    env.drain_stream().await;
    env.flush().await;
    let (read, gate) = gated_read_path(&env, settings).await;
    let reader = read.get("kb-001");
    let writer = async {
        gate.read_done.await.unwrap();
        put_versioned(&env, "2", "99.99").await;
        env.drain_stream().await;
        // The refreshed entry is then evicted (memory pressure, a TTL): only `:ver` remembers.
        env.raw_del("product:kb-001").await;
        gate.release.send(()).unwrap();
    };
    let ((_, lookup), ()) = tokio::join!(reader, writer);
    assert!(matches!(lookup.unwrap(), Lookup::Found(_)));
    // No lease stopped the reader's fill of version 1, but the version did.
    assert_eq!(env.raw_get("product:kb-001").await, None);
    let mut conn = env.redis_conn().await;
    let ver: String = redis::cmd("GET")
        .arg("{product:kb-001}:ver")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ver, "V01:2:0");
    // The next reader fills the current version.
    assert_eq!(env.http_get("kb-001").await.2["price"], json!(99.99));
}

/// Turning a version attribute on (or off) on a live cache, and the rollout in between, when the
/// two functions disagree: `{key}:ver` holds positions of the other kind, which cannot be
/// compared with the new ones. A change then deletes (instead of being refused because a
/// 20-digit sequence number looks newer than version 2), and a fill is guarded by its lease
/// alone (instead of being refused with its lease left held).
#[tokio::test]
async fn a_version_attribute_can_be_turned_on_and_off_on_a_live_cache() {
    let by_sequence = CacheSettings::default();
    let by_version = CacheSettings {
        version_attribute: Some("version".into()),
        ..CacheSettings::default()
    };
    let mut env = TestEnv::with_settings(Refresh, by_sequence.clone()).await;
    put_versioned(&env, "1", "129.99").await;
    env.drain_stream().await;
    assert_eq!(
        price_of(env.raw_get("product:kb-001").await),
        Some(json!(129.99))
    );
    assert_eq!(position_kind(&env).await.as_deref(), Some("S"));

    // The invalidator is switched first: its change cannot be ordered against the sequence
    // number, so it deletes and records the version.
    let versioned = product_cache::invalidate::Invalidator::new(
        env.cache(&by_version).await,
        Refresh,
        by_version.clone(),
    );
    put_versioned(&env, "2", "99.99").await;
    let event = env.new_stream_event().await;
    assert!(versioned.handle(event).await.batch_item_failures.is_empty());
    assert_eq!(
        env.raw_get("product:kb-001").await,
        None,
        "the old price stayed"
    );
    assert_eq!(position_kind(&env).await.as_deref(), Some("V"));
    // A reader still without the attribute fills, guarded by its lease.
    let old_reader = ReadPath::new(
        env.cache(&by_sequence).await,
        env.store(&by_sequence),
        by_sequence.clone(),
    );
    assert_eq!(old_reader.get("kb-001").await.0, CacheStatus::Miss);
    assert_eq!(
        price_of(env.raw_get("product:kb-001").await),
        Some(json!(99.99))
    );

    // Switched back (or a rollout the other way round): the old invalidator's change deletes
    // over the version position, and a versioned reader's fill over the sequence number is
    // written, not refused with its lease left held.
    put_versioned(&env, "3", "89.99").await;
    env.drain_stream().await;
    assert_eq!(position_kind(&env).await.as_deref(), Some("S"));
    assert_eq!(env.raw_get("product:kb-001").await, None);
    let new_reader = ReadPath::new(
        env.cache(&by_version).await,
        env.store(&by_version),
        by_version.clone(),
    );
    assert_eq!(new_reader.get("kb-001").await.0, CacheStatus::Miss);
    assert_eq!(
        price_of(env.raw_get("product:kb-001").await),
        Some(json!(89.99))
    );
    assert_eq!(
        env.raw_get("{product:kb-001}:lease").await,
        None,
        "a lease was left held"
    );
    assert_eq!(new_reader.get("kb-001").await.0, CacheStatus::Hit);
}

/// `S` or `V`: the kind of position `{product:kb-001}:ver` holds.
async fn position_kind(env: &TestEnv) -> Option<String> {
    let ver = env.raw_get("{product:kb-001}:ver").await;
    ver.map(|v| v[..1].to_owned())
}
