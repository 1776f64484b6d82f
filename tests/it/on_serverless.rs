//! The product on ElastiCache Serverless: the read path, the invalidator (both modes), the
//! inspector, the change monitor and the operator commands, configured as a deployment on a
//! serverless cache configures them (`REDIS_CACHE_TYPE=serverless`, `rediss://`, the cache's CA,
//! IAM tokens signed for the serverless cache), against the local stand-in
//! (`local_stack::services::ServerlessCache`): one virtual shard over a primary and a replica
//! `redis-server`, which refuses what serverless refuses (`WAIT`, `CONFIG`, `KEYS`, keyless
//! scripts, `CROSSSLOT`, more than 3,999 arguments) before any backend sees it. Every test
//! ends by checking that the stand-in refused none of the product's requests on either
//! endpoint: a refusal there is a call that fails on AWS.

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_stack::services::{Auth, Endpoint, ServerlessCache, ServerlessOptions};
use product_cache::cache::slots::slot_of;
use product_cache::cache::{Guards, RedisCache};
use product_cache::config::InvalidationMode::{self, Delete, Refresh};
use product_cache::config::{
    CacheSettings, CacheType, IamSettings, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::id::KeyType;
use product_cache::inspect::{InspectSettings, Inspector, Target, Verdict};
use product_cache::invalidate::Invalidator;
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::read::{BatchIds, CacheStatus, ReadPath};
use product_cache::store::DynamoStore;
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};

use crate::eviction::{now_secs, redeliver_older_changes, Outcome, ROOM};
use crate::support::{
    applied, cache_with, command_calls, declared_empty, fixture, http_get, ids_in_one_slot,
    info_field, moto_endpoint, Counting, TestEnv, TestReadPath,
};

/// The IAM-enabled user the functions authenticate as, and the serverless cache's name (the
/// template's `REDIS_IAM_USER` and `REDIS_IAM_CACHE_NAME`).
const IAM_USER: &str = "product-cache-iam";
const CACHE_NAME: &str = "product-cache-serverless";
/// The Region of the test SDK configuration (moto's), which the functions sign their tokens
/// for.
const REGION: &str = "us-east-1";

/// The stand-in with IAM authentication for [`IAM_USER`] on [`CACHE_NAME`].
async fn serverless() -> ServerlessCache {
    ServerlessCache::start(ServerlessOptions {
        auth: Auth::Iam {
            user: IAM_USER.into(),
            cache_name: CACHE_NAME.into(),
            region: REGION.into(),
        },
        ..ServerlessOptions::default()
    })
    .await
    .expect("the serverless stand-in starts")
}

/// A table of its own on the shared moto server, with the functions' cache settings but a 1 s
/// Redis timeout: these tests show what works on serverless, not how fast, and a loaded
/// machine (two shared cores, TLS in a debug build) can outlast the functions' 100 ms.
async fn test_env(mode: InvalidationMode) -> TestEnv {
    let settings = CacheSettings {
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    TestEnv::with_settings(mode, settings).await
}

/// The functions' Redis settings for this serverless cache, as the template sets them: its
/// endpoint over TLS, a cluster, serverless, the CA that signed its certificate, IAM.
fn settings_on(cache: &ServerlessCache) -> RedisSettings {
    RedisSettings {
        cluster: true,
        cache_type: CacheType::Serverless,
        ca_file: Some(cache.ca_file().to_path_buf()),
        iam: Some(IamSettings {
            user_id: IAM_USER.into(),
            cache: CACHE_NAME.into(),
            serverless: true,
        }),
        ..RedisSettings::new(cache.url())
    }
}

/// The same settings as the functions read them from their environment (the template's
/// variables for a serverless cache), with `extra` variables added.
fn environment(cache: &ServerlessCache, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let ca_file = cache.ca_file().display().to_string();
    [
        ("REDIS_URL", cache.url().as_str()),
        ("REDIS_CACHE_TYPE", "serverless"),
        ("REDIS_CA_FILE", &ca_file),
        ("REDIS_IAM_USER", IAM_USER),
        ("REDIS_IAM_CACHE_NAME", CACHE_NAME),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The read function over `redis`, reading `env`'s table, its cache and store counted.
async fn read_function(env: &TestEnv, redis: &RedisSettings) -> TestReadPath {
    ReadPath::new(
        Counting::new(cache_with(redis, &env.settings).await),
        Counting::new(env.store(&env.settings)),
        env.settings.clone(),
    )
}

/// The invalidator over `redis` in `mode`, as the function builds it; in refresh mode with the
/// cache declared empty (the stand-in started empty for this test), once connected.
async fn invalidator(
    env: &TestEnv,
    redis: &RedisSettings,
    mode: InvalidationMode,
) -> Invalidator<RedisCache> {
    let settings = InvalidatorSettings {
        redis: redis.clone(),
        mode,
        cache: env.settings.clone(),
    };
    let invalidator = Invalidator::build(settings, &env.sdk).await.unwrap();
    if mode == Refresh {
        declared_empty(invalidator.cache()).await;
    }
    invalidator
}

/// Reads `id` until the cache takes part (not a bypass): the read function has connected and
/// knows the slot map. Bounded.
async fn until_connected<C, S>(read: &ReadPath<C, S>, id: &str)
where
    C: product_cache::cache::Cache,
    S: product_cache::store::ProductStore,
{
    let started = Instant::now();
    while http_get(read, &format!("/products/{id}")).await.1 == "bypass" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the read function never connected to the serverless cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One read of `id` through the HTTP edge: (status, X-Cache, body).
async fn get<C, S>(read: &ReadPath<C, S>, id: &str) -> (u16, String, Value)
where
    C: product_cache::cache::Cache,
    S: product_cache::store::ProductStore,
{
    http_get(read, &format!("/products/{id}")).await
}

/// A plain connection to a backend server (the primary's, or the replica's), to look at what
/// the product left there without going through the front.
async fn direct(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `key` as the primary holds it.
async fn on_primary(cache: &ServerlessCache, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut direct(cache.backend().port()).await)
        .await
        .unwrap()
}

/// Script calls (`EVALSHA` and `EVAL`) the server on `port` has served.
async fn script_calls(port: u16) -> u64 {
    command_calls(port, "evalsha").await + command_calls(port, "eval").await
}

/// The stand-in refused nothing the product sent, on either endpoint: no unavailable command,
/// no request over 3,999 arguments, no keyless script, no CROSSSLOT, no failed AUTH.
fn nothing_refused(cache: &ServerlessCache) {
    for endpoint in [Endpoint::Primary, Endpoint::Reader] {
        let counters = cache.counters(endpoint);
        assert_eq!(
            counters.refused_total(),
            0,
            "{endpoint:?} refused: {:?}",
            counters.refused
        );
    }
}

/// The price in a document the product cached (`None` for no document or a negative entry).
fn price_of(doc: Option<String>) -> Option<f64> {
    let doc: Value = serde_json::from_str(&doc?).unwrap();
    doc["price"].as_f64()
}

/// A miss takes the lease (the probe script on the primary), reads the table once and fills;
/// the next read is a hit served by ONE plain GET on the primary (no script, no table read).
/// A MODIFY and then a REMOVE through the invalidator each make the next read miss and answer
/// the table's new state. Nothing the product sent was refused.
#[tokio::test]
async fn a_read_misses_fills_and_hits_and_each_invalidation_makes_it_miss_again() {
    let mut env = test_env(Delete).await;
    let cache = serverless().await;
    let redis = settings_on(&cache);
    let read = read_function(&env, &redis).await;
    let invalidator = invalidator(&env, &redis, Delete).await;
    until_connected(&read, "warm").await;
    env.put_product("kb-001", "129.99").await;
    applied(&invalidator, env.new_stream_event().await).await;
    let port = cache.backend().port();
    let table_reads = read.store().count();

    let (gets, scripts) = (command_calls(port, "get").await, script_calls(port).await);
    let (code, x_cache, body) = get(&read, "kb-001").await;
    assert_eq!((code, x_cache.as_str()), (200, "miss"), "{body}");
    assert_eq!(body["price"], json!(129.99));
    assert_eq!(read.store().count() - table_reads, 1, "one table read");
    // The probe (lease) and the fill are scripts on the primary, and the fill landed there.
    assert!(script_calls(port).await - scripts >= 2, "no probe and fill");
    assert!(command_calls(port, "get").await > gets, "the miss's GET");
    assert_eq!(
        price_of(on_primary(&cache, "product:kb-001").await),
        Some(129.99)
    );

    let (gets, scripts) = (command_calls(port, "get").await, script_calls(port).await);
    let forwarded = cache.counters(Endpoint::Primary).forwarded_of("GET");
    let (code, x_cache, hit) = get(&read, "kb-001").await;
    assert_eq!((code, x_cache.as_str()), (200, "hit"));
    assert_eq!(hit, body);
    assert_eq!(command_calls(port, "get").await - gets, 1, "one GET a hit");
    assert_eq!(script_calls(port).await - scripts, 0, "a hit ran a script");
    assert_eq!(
        cache.counters(Endpoint::Primary).forwarded_of("GET") - forwarded,
        1
    );
    assert_eq!(
        read.store().count() - table_reads,
        1,
        "the hit read the table"
    );

    // MODIFY: the cached copy deleted; the next read misses and answers the new price.
    env.put_product("kb-001", "99.99").await;
    applied(&invalidator, env.new_stream_event().await).await;
    assert_eq!(on_primary(&cache, "product:kb-001").await, None);
    let (code, x_cache, body) = get(&read, "kb-001").await;
    assert_eq!(
        (code, x_cache.as_str(), &body["price"]),
        (200, "miss", &json!(99.99))
    );
    assert_eq!(get(&read, "kb-001").await.1, "hit");

    // REMOVE: deleted again; the next read misses and answers 404.
    env.delete_product("kb-001").await;
    applied(&invalidator, env.new_stream_event().await).await;
    assert_eq!(on_primary(&cache, "product:kb-001").await, None);
    let (code, x_cache, _) = get(&read, "kb-001").await;
    assert_eq!((code, x_cache.as_str()), (404, "miss"));
    nothing_refused(&cache);
}

/// `GET /products?ids=...` for `ids`, percent-encoded.
fn batch_path(ids: &[String]) -> String {
    let encoded: Vec<String> = ids
        .iter()
        .map(|id| {
            percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        })
        .collect();
    format!("/products?ids={}", encoded.join(","))
}

/// A batch of 50 products in about 50 hash slots: on a cluster of one shard all of them go to
/// the one node, where a multi-key command would be refused CROSSSLOT. First all misses (one
/// table read), then all hits, each product its own price; nothing refused.
#[tokio::test]
async fn a_batch_over_many_slots_misses_then_hits_without_crossslot() {
    let env = test_env(Delete).await;
    let cache = serverless().await;
    let read = read_function(&env, &settings_on(&cache)).await;
    let ids: Vec<String> = (0..50).map(|i| format!("batch-{i}")).collect();
    let slots: BTreeSet<u16> = ids
        .iter()
        .map(|id| slot_of(&format!("product:{id}")))
        .collect();
    assert!(slots.len() >= 45, "only {} slots", slots.len());
    for (i, id) in ids.iter().enumerate() {
        env.put_product(id, &i.to_string()).await;
    }
    until_connected(&read, "warm").await;
    let table_reads = read.store().count();

    let batch = BatchIds::parse(Some(&batch_path(&ids)["/products?".len()..]), KeyType::S).unwrap();
    let answer = read.get_many(&batch).await;
    assert_eq!(answer.count(CacheStatus::Miss), 50, "{answer:?}");
    assert_eq!(read.store().count() - table_reads, 1, "one BatchGetItem");
    for id in &ids {
        assert!(
            on_primary(&cache, &format!("product:{id}")).await.is_some(),
            "{id} not filled"
        );
    }

    let (code, x_cache, body) = http_get(&read, &batch_path(&ids)).await;
    assert_eq!(
        (code, x_cache.as_str()),
        (200, "hits=50 misses=0 bypasses=0"),
        "{body}"
    );
    assert_eq!(read.store().count() - table_reads, 1, "hits read the table");
    let products = body["products"].as_array().unwrap();
    assert_eq!(products.len(), 50);
    for (i, (entry, id)) in products.iter().zip(&ids).enumerate() {
        assert_eq!(entry["id"], json!(id));
        assert_eq!(entry["product"]["price"], json!(i), "{id}");
    }
    nothing_refused(&cache);
}

/// Until the replica holds every one of `keys` (replication is asynchronous). Bounded.
async fn until_replicated(cache: &ServerlessCache, keys: &[String]) {
    let mut replica = direct(cache.replica().port()).await;
    let started = Instant::now();
    loop {
        let held: i64 = redis::cmd("EXISTS")
            .arg(keys)
            .query_async(&mut replica)
            .await
            .unwrap();
        if held as usize == keys.len() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the replica holds {held} of {} keys",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replica reads (`REDIS_READ_FROM_REPLICAS`): misses and fills go to the primary endpoint;
/// hits to the reader endpoint, which the client reaches with READONLY (no MOVED), and which
/// serves them from the replica: the replica's GET count grows by the number of hits, the
/// primary's not at all.
#[tokio::test]
async fn with_replica_reads_hits_are_served_by_the_reader_endpoint() {
    let env = test_env(Delete).await;
    let cache = serverless().await;
    let redis = RedisSettings {
        read_from_replicas: true,
        ..settings_on(&cache)
    };
    let read = read_function(&env, &redis).await;
    let ids: Vec<String> = (0..10).map(|i| format!("rr-{i}")).collect();
    for id in &ids {
        env.put_product(id, "10").await;
    }
    until_connected(&read, "warm").await;
    let scripts = cache.counters(Endpoint::Primary).forwarded_of("EVALSHA");
    for id in &ids {
        let (code, x_cache, _) = get(&read, id).await;
        assert_eq!((code, x_cache.as_str()), (200, "miss"), "{id}");
    }
    // The fills (and probes) went to the primary endpoint, none to the reader.
    assert!(cache.counters(Endpoint::Primary).forwarded_of("EVALSHA") - scripts >= 20);
    assert_eq!(cache.counters(Endpoint::Reader).forwarded_of("EVALSHA"), 0);
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();
    until_replicated(&cache, &keys).await;
    // The first hit may open the client's connection to the reader endpoint; that connection
    // may take longer than a read's timeout on a loaded machine.
    let started = Instant::now();
    while get(&read, &ids[0]).await.1 != "hit" {
        assert!(started.elapsed() < Duration::from_secs(10), "never a hit");
    }

    let primary = command_calls(cache.backend().port(), "get").await;
    let replica = command_calls(cache.replica().port(), "get").await;
    let reader = cache.counters(Endpoint::Reader);
    for id in &ids {
        let (code, x_cache, body) = get(&read, id).await;
        assert_eq!(
            (code, x_cache.as_str(), &body["price"]),
            (200, "hit", &json!(10))
        );
    }
    assert_eq!(
        command_calls(cache.backend().port(), "get").await - primary,
        0
    );
    assert_eq!(
        command_calls(cache.replica().port(), "get").await - replica,
        ids.len() as u64
    );
    let after = cache.counters(Endpoint::Reader);
    assert_eq!(
        after.forwarded_of("GET") - reader.forwarded_of("GET"),
        ids.len() as u64
    );
    assert!(
        after.answered.get("READONLY").copied().unwrap_or(0) >= 1,
        "no READONLY on the reader endpoint: {after:?}"
    );
    assert_eq!(after.moved_total(), 0, "{:?}", after.moved);
    nothing_refused(&cache);
}

/// Both invalidation modes on ordinary batches: a MODIFY, a REMOVE and an INSERT (of a product
/// cached as not found). Delete mode deletes the three cached copies and leaves the unchanged
/// product cached; refresh mode writes the new image, removes the deleted product and writes
/// the inserted one, so the next reads hit with the table's state.
#[tokio::test]
async fn both_modes_apply_modify_remove_and_insert() {
    let cache = serverless().await;
    let redis = settings_on(&cache);
    for mode in [Delete, Refresh] {
        let mut env = test_env(mode).await;
        let read = read_function(&env, &redis).await;
        let invalidator = invalidator(&env, &redis, mode).await;
        let id = |name: &str| format!("{mode:?}-{name}");
        for name in ["changed", "removed", "kept"] {
            env.put_product(&id(name), "10").await;
        }
        applied(&invalidator, env.new_stream_event().await).await;
        until_connected(&read, "warm").await;
        // Cached: by these reads in delete mode, by the INSERTs' refreshes in refresh mode.
        let first = if mode == Refresh { "hit" } else { "miss" };
        for name in ["changed", "removed", "kept"] {
            let (code, x_cache, _) = get(&read, &id(name)).await;
            assert_eq!((code, x_cache.as_str()), (200, first), "{mode:?} {name}");
        }
        let (code, _, _) = get(&read, &id("inserted")).await;
        assert_eq!(code, 404);
        assert_eq!(
            on_primary(&cache, &format!("product:{}", id("inserted")))
                .await
                .as_deref(),
            Some("null"),
            "the not-found answer is cached"
        );

        env.put_product(&id("changed"), "20").await;
        env.delete_product(&id("removed")).await;
        env.put_product(&id("inserted"), "30").await;
        let event = env.new_stream_event().await;
        assert_eq!(event["Records"].as_array().unwrap().len(), 3);
        applied(&invalidator, event).await;

        let cached = |name| {
            let key = format!("product:{}", id(name));
            let cache = &cache;
            async move { on_primary(cache, &key).await }
        };
        assert_eq!(price_of(cached("kept").await), Some(10.0), "{mode:?}");
        match mode {
            Delete => {
                for name in ["changed", "removed", "inserted"] {
                    assert_eq!(cached(name).await, None, "{mode:?} {name}");
                }
            }
            Refresh => {
                assert_eq!(price_of(cached("changed").await), Some(20.0));
                assert_eq!(price_of(cached("removed").await), None);
                assert_eq!(price_of(cached("inserted").await), Some(30.0));
            }
        }
        // What the reads answer now: the table's state, from the cache in refresh mode.
        let expected = if mode == Refresh { "hit" } else { "miss" };
        for (name, price) in [("changed", 20), ("inserted", 30)] {
            let (code, x_cache, body) = get(&read, &id(name)).await;
            assert_eq!(
                (code, x_cache.as_str(), &body["price"]),
                (200, expected, &json!(price)),
                "{mode:?} {name}"
            );
        }
        assert_eq!(get(&read, &id("removed")).await.0, 404);
    }
    nothing_refused(&cache);
}

/// A MODIFY of product `id` to `price`, created at `created` (epoch seconds), `seq` its
/// sequence number.
fn change(id: &str, price: usize, seq: usize, created: f64) -> Value {
    let mut r = fixture("modify.json")["Records"][0].clone();
    let d = &mut r["dynamodb"];
    d["Keys"]["productId"] = json!({"S": id});
    d["NewImage"]["productId"] = json!({"S": id});
    d["NewImage"]["price"] = json!({"N": price.to_string()});
    d["SequenceNumber"] = json!(format!("{}", 100_000_000_000u64 + seq as u64));
    d["ApproximateCreationDateTime"] = json!(created);
    r
}

/// The invalidator built from its environment as the Lambda builds it (the template's variables
/// for a serverless cache, refresh mode): a batch of 1,000 changes whose keys all share ONE
/// hash slot (so nothing but the argument limit stops a single script call from carrying them
/// all) is applied in full, every document written, without a request over 3,999 arguments
/// (the library splits it into calls of at most 399 operations: at least 3 script calls), and
/// no WAIT is sent. The same environment with
/// `REDIS_CONFIRM_REPLICAS=1` is refused at start, naming the variable, and so are settings
/// built in code with confirmation when the cache is built.
#[tokio::test]
async fn a_thousand_changes_in_one_slot_apply_in_calls_under_the_argument_limit() {
    let env = TestEnv::new(Refresh).await;
    let cache = serverless().await;
    // A 1 s timeout (the template's default is 100 ms): 1,000 operations through the
    // stand-in's TLS front (a debug build) on a loaded machine can outlast the default budget.
    let vars = environment(
        &cache,
        &[
            ("INVALIDATION_MODE", "refresh"),
            ("REDIS_TIMEOUT_MS", "1000"),
        ],
    );
    let settings = InvalidatorSettings::from_source(&vars[..]).unwrap();
    assert_eq!(settings.redis.cache_type, CacheType::Serverless);
    assert!(settings.redis.cluster, "serverless implies a cluster");
    assert_eq!(settings.mode, Refresh);
    let invalidator = Invalidator::build(settings, &env.sdk).await.unwrap();
    declared_empty(invalidator.cache()).await;

    let ids = ids_in_one_slot(1_000);
    let created = now_secs();
    let records: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| change(id, i, i, created))
        .collect();
    let port = cache.backend().port();
    let scripts = script_calls(port).await;
    applied(&invalidator, json!({ "Records": records })).await;
    let calls = script_calls(port).await - scripts;
    assert!(
        calls >= 1_000u64.div_ceil(399),
        "{calls} script calls for 1,000 operations in one slot"
    );
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();
    let docs: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut direct(port).await)
        .await
        .unwrap();
    for (i, doc) in docs.into_iter().enumerate() {
        assert_eq!(price_of(doc), Some(i as f64), "{}", keys[i]);
    }
    let primary = cache.counters(Endpoint::Primary);
    assert_eq!(primary.refused_of("WAIT"), 0);
    assert_eq!(
        command_calls(port, "wait").await,
        0,
        "a WAIT reached the primary"
    );
    nothing_refused(&cache);

    let confirming = environment(&cache, &[("REDIS_CONFIRM_REPLICAS", "1")]);
    let err = InvalidatorSettings::from_source(&confirming[..])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("REDIS_CONFIRM_REPLICAS") && err.contains("serverless"),
        "{err}"
    );
    // Settings built in code (a tool, a test) meet the same rule when the cache is built,
    // rather than failing every batch on the refused WAIT.
    let confirming = RedisSettings {
        confirm_replicas: 1,
        ..settings_on(&cache)
    };
    let err =
        match RedisCache::from_settings(&confirming, &CacheSettings::default(), &env.sdk).await {
            Ok(_) => panic!("a serverless cache with confirmation was built"),
            Err(e) => e.to_string(),
        };
    assert!(err.contains("REDIS_CONFIRM_REPLICAS"), "{err}");
}

/// The inspector and the change monitor on the serverless cache: the inspector's sample
/// (RANDOMKEY on the one primary, then the values and the table's items) finds exactly the one
/// document planted on the primary with another price; the change monitor, given the batch
/// the invalidator applied, finds the one document planted after its change, and, once that is
/// repaired, nothing.
#[tokio::test]
async fn the_inspector_and_the_change_monitor_find_what_was_planted_and_nothing_else() {
    let mut env = test_env(Delete).await;
    let cache = serverless().await;
    let redis = settings_on(&cache);
    let read = read_function(&env, &redis).await;
    let invalidator = invalidator(&env, &redis, Delete).await;
    for i in 0..10 {
        env.put_product(&format!("ins-{i}"), "10").await;
    }
    let event = env.new_stream_event().await;
    applied(&invalidator, event.clone()).await;
    // Delete mode: no epoch keys (one per slot) for the sample to draw past. The warm-up reads
    // a product, as a not-found answer would be cached and sampled; then all are cached.
    until_connected(&read, "ins-0").await;
    for i in 0..10 {
        let (code, _, _) = get(&read, &format!("ins-{i}")).await;
        assert_eq!(code, 200);
    }
    let (env, redis) = (&env, &redis);
    let inspector = |repair| async move {
        Inspector::new(
            cache_with(redis, &env.settings).await,
            env.store(&env.settings),
            env.settings.clone(),
            InspectSettings {
                sample: 1000,
                grace: Duration::from_millis(200),
                repair,
                ..InspectSettings::default()
            },
        )
    };
    let stale = json!({"name": "Product ins-3", "price": 7.0, "productId": "ins-3"}).to_string();
    let mut primary = direct(cache.backend().port()).await;
    let _: () = redis::cmd("SET")
        .arg("product:ins-3")
        .arg(&stale)
        .query_async(&mut primary)
        .await
        .unwrap();

    let looking = inspector(false).await;
    let report = looking.run(Target::Sample(1000)).await.unwrap();
    assert_eq!(report.checked(), 10, "every cached product sampled");
    let inconsistent: Vec<&str> = report
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Inconsistent)
        .map(|r| r.key.as_str())
        .collect();
    assert_eq!(inconsistent, ["product:ins-3"]);

    let records = event["Records"].as_array().unwrap().clone();
    let report = looking.check_changes(&records).await;
    assert_eq!(report.rows.len(), 10);
    assert_eq!(report.inconsistent().collect::<Vec<_>>(), ["product:ins-3"]);
    let report = inspector(true).await.check_changes(&records).await;
    assert_eq!(report.repaired, 1);
    assert_eq!(on_primary(&cache, "product:ins-3").await, None);
    let report = looking.check_changes(&records).await;
    assert_eq!(report.inconsistent().count(), 0, "{report:?}");
    let report = looking.run(Target::Sample(1000)).await.unwrap();
    assert_eq!(report.count(Verdict::Inconsistent), 0);
    nothing_refused(&cache);
}

/// `pcache <args>` pointed at `env`'s table on moto and at the serverless cache, its Redis
/// settings from the variables the functions read (`REDIS_CACHE_TYPE=serverless`,
/// `REDIS_CA_FILE`, `REDIS_IAM_USER`, `REDIS_IAM_CACHE_NAME`), with `REDIS_TIMEOUT_MS=1000`: each
/// command is a new process whose first calls come right after its TLS handshakes and IAM
/// signing, and on a loaded machine (a debug build, two shared cores) the functions' 100 ms
/// did not cover them: `redrive`'s batch failed in one run of three beside two busy loops, and
/// under more load `warm`'s first batch too ("still connecting to redis").
async fn pcache(env: &TestEnv, cache: &ServerlessCache, args: &[&str]) -> Output {
    let state_dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(crate::support::binary("pcache"));
    cmd.args(args)
        .args(["--endpoint", moto_endpoint(), "--redis-url", &cache.url()])
        .args(["--table", &env.table])
        .arg("--state-dir")
        .arg(state_dir.path())
        .env_remove("REDIS_URL")
        .env_remove("TABLE_NAME")
        .envs(
            environment(cache, &[("REDIS_TIMEOUT_MS", "1000")])
                .into_iter()
                .filter(|(k, _)| k != "REDIS_URL"),
        )
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("pcache finishes")
        .expect("pcache runs")
}

/// The operator commands that touch Redis, on the serverless cache, each a new process that
/// connects as the functions do (IAM, TLS, the cache's CA): `warm` caches products through the
/// read path, `inspect` compares cached products with the table (a lost invalidation fails it),
/// by ids, by sample and by the stream's changes (`--changes`), and repairs what it finds, `redrive` applies a failed batch again from its on-failure
/// record, `purge` deletes cached copies and their leases.
#[tokio::test]
async fn the_operator_commands_work_on_a_serverless_cache() {
    let mut env = TestEnv::new(Delete).await;
    let cache = serverless().await;
    let ids = ["op-1", "op-2", "op-3", "op-4"];
    for id in ids {
        env.put_product(id, "10").await;
    }
    env.new_stream_event().await;
    let listed = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(listed.path(), ids.join("\n")).unwrap();
    let warm = pcache(
        &env,
        &cache,
        &["warm", "--ids", listed.path().to_str().unwrap()],
    )
    .await;
    assert!(warm.status.success(), "{}", text(&warm));
    assert!(text(&warm).contains("filled 4"), "{}", text(&warm));
    for id in ids {
        assert_eq!(
            price_of(on_primary(&cache, &format!("product:{id}")).await),
            Some(10.0),
            "{id}"
        );
    }
    // Lost invalidations: op-2 and op-3 change in the table; the batch never reaches the cache.
    env.put_product("op-2", "20").await;
    env.put_product("op-3", "20").await;
    let lost = env.new_stream_event().await["Records"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(lost.len(), 2);

    let look = pcache(
        &env,
        &cache,
        &["inspect", "op-1", "op-2", "--grace-ms", "200"],
    )
    .await;
    let out = text(&look);
    assert!(
        !look.status.success(),
        "an inconsistency fails inspect: {out}"
    );
    assert!(out.contains("INCONSISTENT   product:op-2"), "{out}");
    assert!(out.contains("consistent     product:op-1"), "{out}");

    // The lost batch's on-failure record, redriven from a file: both changes applied.
    let failed = tempfile::NamedTempFile::new().unwrap();
    let record = crate::operator::failure_record(&env, &lost, Duration::from_secs(60)).await;
    std::fs::write(failed.path(), format!("{record}\n")).unwrap();
    let redrive = pcache(
        &env,
        &cache,
        &["redrive", "--from-file", failed.path().to_str().unwrap()],
    )
    .await;
    assert!(redrive.status.success(), "{}", text(&redrive));
    assert!(
        text(&redrive).contains("applied 2 records"),
        "{}",
        text(&redrive)
    );
    for key in ["product:op-2", "product:op-3"] {
        assert_eq!(on_primary(&cache, key).await, None, "{key}");
    }

    // A stale copy written over op-4's (a race lost): a sample finds it and repairs it.
    let mut primary = direct(cache.backend().port()).await;
    let stale = json!({"name": "Product op-4", "price": 1.0, "productId": "op-4"}).to_string();
    let _: () = redis::cmd("SET")
        .arg("product:op-4")
        .arg(&stale)
        .query_async(&mut primary)
        .await
        .unwrap();
    // The change monitor's way (the stream's changes in the last hour, each key judged on its
    // newest) finds it too: op-4's INSERT is in the range.
    let changes = ["inspect", "--changes", "--grace-ms", "0"];
    let judged = pcache(&env, &cache, &changes).await;
    let out = text(&judged);
    assert!(!judged.status.success(), "{out}");
    assert!(out.contains("    product:op-4  sequence "), "{out}");
    let repair = pcache(
        &env,
        &cache,
        &["inspect", "--sample", "50", "--grace-ms", "200", "--repair"],
    )
    .await;
    assert!(repair.status.success(), "{}", text(&repair));
    assert!(text(&repair).contains("1 repaired"), "{}", text(&repair));
    assert_eq!(on_primary(&cache, "product:op-4").await, None);
    let judged = pcache(&env, &cache, &changes).await;
    assert!(judged.status.success(), "{}", text(&judged));

    let _: () = redis::cmd("SET")
        .arg("{product:op-1}:lease")
        .arg("someone")
        .query_async(&mut primary)
        .await
        .unwrap();
    let purge = pcache(&env, &cache, &["purge", "op-1", "op-4"]).await;
    assert!(purge.status.success(), "{}", text(&purge));
    assert!(
        text(&purge).contains("purged 2 keys (1 held a value)"),
        "{}",
        text(&purge)
    );
    for key in ["product:op-1", "{product:op-1}:lease"] {
        assert_eq!(on_primary(&cache, key).await, None, "{key}");
    }
    nothing_refused(&cache);
}

fn text(out: &Output) -> String {
    crate::operator::text(out)
}

/// eviction.rs's scenario on a serverless cache at its storage maximum (`volatile-lru`), with
/// `evicted_keys` gone from the INFO the functions see: every item refreshed to price 1, then
/// to price 2, while the cache evicts; then the price-1 record of every item cached at price 2
/// delivered again.
async fn redeliver_older_changes_on_a_full_serverless_cache(guards: Guards) -> Outcome {
    let cache = serverless().await;
    cache.set_evicted_keys_in_info(false);
    // A 1 s timeout: declaring 16,384 epochs and applying batches of 100 through the stand-in's
    // TLS front (a debug build) on a loaded machine can outlast the functions' 100 ms; what is
    // shown here does not depend on it.
    let settings = CacheSettings {
        guards,
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
    let functions = RedisCache::from_settings(&settings_on(&cache), &settings, &sdk)
        .await
        .unwrap();
    declared_empty(&functions).await;
    // The storage maximum: what the epochs (16,384 keys without a TTL) use, and ROOM more, as
    // eviction.rs's full node; set on the primary itself (the front refuses CONFIG).
    let mut primary = direct(cache.backend().port()).await;
    let used = info_field(&mut primary, "memory", "used_memory")
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + ROOM)
        .query_async(&mut primary)
        .await
        .unwrap();
    let invalidator = Invalidator::new(functions, Refresh, settings);
    let outcome = redeliver_older_changes(&invalidator, &mut primary).await;
    eprintln!(
        "serverless, {guards:?}: {} keys evicted, {} documents at the newer price ({} without \
         their position), {} at the older price after the older records came again",
        outcome.evicted, outcome.newer_cached, outcome.without_position, outcome.older_after
    );
    nothing_refused(&cache);
    outcome
}

/// On a serverless cache at its maximum, `volatile-lru` evicts documents but never a position
/// (kept without a TTL there), so an older change delivered again finds the newer position and
/// writes nothing back: not one document goes back to the older price, though thousands of
/// keys were evicted, and though the functions see no `evicted_keys` in INFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_serverless_cache_an_older_change_never_writes_back() {
    let outcome = redeliver_older_changes_on_a_full_serverless_cache(Guards::default()).await;
    assert!(outcome.evicted > 1_000, "{} evicted", outcome.evicted);
    assert!(
        outcome.newer_cached > 200,
        "{} cached",
        outcome.newer_cached
    );
    assert_eq!(outcome.without_position, 0, "a position was evicted");
    assert_eq!(
        outcome.older_after, 0,
        "{} of {} documents went back to the older price",
        outcome.older_after, outcome.newer_cached
    );
}

/// The guard off (positions with a TTL again, as on a node-based cache, and no eviction count
/// to watch): `volatile-lru` evicts positions too, and older prices come back. The test above
/// would catch that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_serverless_cache_without_the_guard_older_prices_come_back() {
    let outcome = redeliver_older_changes_on_a_full_serverless_cache(Guards {
        evictions: false,
        ..Guards::default()
    })
    .await;
    assert!(outcome.without_position > 0, "no position was evicted");
    assert!(
        outcome.older_after > 0,
        "no older price came back with the guard off ({} documents without their position)",
        outcome.without_position
    );
}

/// The serverless cache's primary stalls (SIGSTOP: connections open, nothing answered) while
/// this lives; resumed when dropped, also when the test fails.
struct Stalled<'a>(&'a ServerlessCache);

impl<'a> Stalled<'a> {
    fn new(cache: &'a ServerlessCache) -> Self {
        cache.backend().stall();
        Self(cache)
    }
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        self.0.backend().resume();
    }
}

/// The serverless cache stops answering (its primary stalled behind the front): reads answer
/// from the table (200, bypass), after at most the breaker's 3 timeouts without waiting for
/// the cache (breaker bypasses, from the read's metrics line); a batch fails and is reported for
/// retry. Resumed: the retried batch applies and hits come back, within bounded polls.
#[tokio::test]
async fn a_stalled_serverless_cache_is_bypassed_and_recovered_from() {
    let mut env = TestEnv::new(Delete).await;
    let cache = serverless().await;
    let redis = settings_on(&cache);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let read = ReadPath::build(
        ReadSettings::new(redis.clone(), &env.table, env.settings.clone()),
        &env.sdk,
    )
    .await
    .unwrap()
    .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    let invalidator = invalidator(&env, &redis, Delete).await;
    env.put_product("kb-001", "129.99").await;
    applied(&invalidator, env.new_stream_event().await).await;
    until_hit(&read, "kb-001").await;

    let stalled = Stalled::new(&cache);
    // One read: its answer, and whether its metrics line counts a breaker bypass.
    let read_once = || async {
        let before = lines.lock().unwrap().len();
        let (code, x_cache, body) = get(&read, "kb-001").await;
        assert_eq!(
            (code, x_cache.as_str(), &body["price"]),
            (200, "bypass", &json!(129.99)),
            "a read on a stalled cache"
        );
        let line: Value = serde_json::from_str(&lines.lock().unwrap()[before]).unwrap();
        line["BreakerBypasses"].as_u64().expect("BreakerBypasses")
    };
    let failures = redis.breaker.failures;
    let mut timed_out = 0;
    while read_once().await == 0 {
        timed_out += 1;
        assert!(
            timed_out <= failures,
            "{timed_out} reads waited for the stalled cache: the breaker never opened"
        );
    }
    // Open: the next reads answer from the table without trying the cache.
    for _ in 0..3 {
        assert_eq!(read_once().await, 1, "the breaker did not stay open");
    }
    env.put_product("kb-001", "99.99").await;
    let event = env.new_stream_event().await;
    let response = invalidator.handle(event.clone()).await;
    assert_eq!(
        response.batch_item_failures.len(),
        1,
        "a batch on a stalled cache was acknowledged: {response:?}"
    );

    drop(stalled);
    // Lambda retries the batch; the breaker lets a trial call through within its open interval.
    let started = Instant::now();
    while !invalidator
        .handle(event.clone())
        .await
        .batch_item_failures
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the retry never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(on_primary(&cache, "product:kb-001").await, None);
    until_hit(&read, "kb-001").await;
    let (_, _, body) = get(&read, "kb-001").await;
    assert_eq!(body["price"], json!(99.99));
    nothing_refused(&cache);
}

/// Reads `id` until a hit (bounded).
async fn until_hit(read: &ReadPath<RedisCache, DynamoStore>, id: &str) {
    let started = Instant::now();
    loop {
        let (code, x_cache, _) = http_get(read, &format!("/products/{id}")).await;
        if (code, x_cache.as_str()) == (200, "hit") {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{id} never hit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
