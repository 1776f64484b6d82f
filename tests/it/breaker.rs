//! A cache node that stops answering without closing its connections (SIGSTOP: what a primary
//! mid-failover or a node being swapped looks like to a client): each node's circuit breaker
//! must make it cost a few timeouts, not one per call, and notice when it answers again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_stack::services::{DelayedRedis, RedisCluster, RedisServer};
use product_cache::cache::{Cache, CacheError, CacheOp, RedisCache};
use product_cache::config::{
    BreakerSettings, CacheSettings, InvalidationMode::*, ReadSettings, RedisSettings,
};
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::read::ReadPath;
use product_cache::store::DynamoStore;
use serde_json::json;

use crate::support::{cache_with, http_get, TestEnv};

/// A `redis-server` stopped (SIGSTOP) while this lives: it keeps its connections open and
/// answers nothing. Resumed (SIGCONT) when dropped, also when the test fails.
struct Stalled<'a>(&'a RedisServer);

impl<'a> Stalled<'a> {
    fn new(server: &'a RedisServer) -> Self {
        server.stall();
        Self(server)
    }
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

/// The read function over `redis` as the Lambda builds it (default cache settings, so the
/// production `REDIS_TIMEOUT_MS`), its metrics kept in memory, a line per request.
async fn read_function(
    env: &TestEnv,
    redis: RedisSettings,
) -> (ReadPath<RedisCache, DynamoStore>, Lines) {
    let lines = Lines::default();
    let settings = ReadSettings::new(redis, &env.table, CacheSettings::default());
    let read = ReadPath::build(settings, &env.sdk)
        .await
        .unwrap()
        .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    (read, lines)
}

/// One read of `id` through the HTTP edge: its `X-Cache`, the price answered, and whether it
/// counted as a breaker bypass (from the metrics line it flushed).
async fn get(
    read: &ReadPath<RedisCache, DynamoStore>,
    lines: &Lines,
    id: &str,
) -> (String, serde_json::Value, u64) {
    let before = lines.lock().unwrap().len();
    let (status, x_cache, body) = http_get(read, &format!("/products/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let lines = lines.lock().unwrap();
    assert_eq!(lines.len(), before + 1, "one metrics line per request");
    let line: serde_json::Value = serde_json::from_str(&lines[before]).unwrap();
    let breaker = line["BreakerBypasses"]
        .as_u64()
        .expect("BreakerBypasses emitted");
    (x_cache, body["price"].clone(), breaker)
}

/// Reads until `id` is a hit (bounded): connected, filled.
async fn until_hit(
    read: &ReadPath<RedisCache, DynamoStore>,
    lines: &Lines,
    id: &str,
    within: Duration,
) {
    let started = Instant::now();
    loop {
        if get(read, lines, id).await.0 == "hit" {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{id} never hit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A single node behind a counting proxy, with the read function over it, and `kb-001` cached.
async fn single_node(
    breaker: BreakerSettings,
) -> (
    TestEnv,
    DelayedRedis,
    ReadPath<RedisCache, DynamoStore>,
    Lines,
) {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let redis = DelayedRedis::start(Duration::ZERO).await.unwrap();
    let settings = RedisSettings {
        breaker,
        ..RedisSettings::new(redis.url())
    };
    let (read, lines) = read_function(&env, settings).await;
    until_hit(&read, &lines, "kb-001", Duration::from_secs(10)).await;
    (env, redis, read, lines)
}

#[tokio::test]
async fn a_stalled_node_costs_a_few_timeouts_then_no_calls_until_it_answers_again() {
    let breaker = BreakerSettings::default();
    let (_env, redis, read, lines) = single_node(breaker).await;
    let stalled = Stalled::new(redis.server());

    // Until the breaker opens, each read waits out its timeout (the lease hand-back in its
    // after-work is a call that fails too, so it can open during an earlier read).
    let mut timed_out = 0;
    let sent_before_opening = loop {
        let sent = redis.proxy().bytes();
        let (x_cache, price, breaker_bypass) = get(&read, &lines, "kb-001").await;
        assert_eq!((x_cache.as_str(), &price), ("bypass", &json!(129.99)));
        if breaker_bypass == 1 {
            break sent;
        }
        timed_out += 1;
        assert!(
            timed_out <= breaker.failures,
            "{timed_out} reads paid the timeout; the breaker never opened"
        );
    };
    assert!(timed_out >= 1, "opened before any failure");

    // Open: every read answers from the table without sending Redis a byte.
    let opened = Instant::now();
    for _ in 0..5 {
        let (x_cache, price, breaker_bypass) = get(&read, &lines, "kb-001").await;
        assert_eq!(
            (x_cache.as_str(), &price, breaker_bypass),
            ("bypass", &json!(129.99), 1)
        );
    }
    assert_eq!(
        redis.proxy().bytes(),
        sent_before_opening,
        "reads went to the stalled node through an open breaker ({:?} after it opened)",
        opened.elapsed()
    );

    // Resumed: within a few open intervals, a trial read hits and closes the breaker.
    drop(stalled);
    until_hit(&read, &lines, "kb-001", Duration::from_secs(5)).await;
    for _ in 0..3 {
        let (x_cache, _, breaker_bypass) = get(&read, &lines, "kb-001").await;
        assert_eq!(
            (x_cache.as_str(), breaker_bypass),
            ("hit", 0),
            "the breaker did not close"
        );
    }
}

/// The guard off (`REDIS_BREAKER_FAILURES=0`): every read during the stall goes to Redis and
/// waits out its timeout.
#[tokio::test]
async fn without_the_breaker_every_read_goes_to_the_stalled_node() {
    let off = BreakerSettings {
        failures: 0,
        ..BreakerSettings::default()
    };
    let (_env, redis, read, lines) = single_node(off).await;
    let _stalled = Stalled::new(redis.server());
    for n in 0..6 {
        let sent = redis.proxy().bytes();
        let (x_cache, price, breaker_bypass) = get(&read, &lines, "kb-001").await;
        assert_eq!(
            (x_cache.as_str(), &price, breaker_bypass),
            ("bypass", &json!(129.99), 0)
        );
        assert!(
            redis.proxy().bytes() > sent,
            "read {n} sent nothing to Redis"
        );
    }
}

/// Which node (real port) serves each of `ids`' keys, by the cluster's view now.
async fn owners(cluster: &RedisCluster, ids: &[String]) -> Vec<u16> {
    let roles = cluster.roles().await.unwrap();
    ids.iter()
        .map(|id| {
            let slot = product_cache::cache::slots::slot_of(&format!("product:{id}"));
            roles
                .iter()
                .find(|r| r.primary && r.serves(slot))
                .expect("every slot is served")
                .port
        })
        .collect()
}

async fn node_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Until `cache` places each key on its node by address (the slot map fetched): before that
/// the whole cluster has one breaker.
async fn until_mapped(cache: &RedisCache, keys: &[String], ports: &[u16]) {
    let started = Instant::now();
    loop {
        let mapped = keys
            .iter()
            .zip(ports)
            .all(|(key, port)| cache.breaker_node(key) == format!("127.0.0.1:{port}"));
        if mapped {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no slot map");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn on_a_cluster_only_the_stalled_primarys_keys_bypass_and_fail() {
    // Nodes keep serving their own slots while another is down: the stall may outlast
    // `cluster-node-timeout` on a loaded machine, and then a cluster requiring full coverage
    // would refuse every key, which is another test.
    let cluster = RedisCluster::start_with(3, &["--cluster-require-full-coverage", "no"])
        .await
        .unwrap();
    let env = TestEnv::new(Delete).await;
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    // Two products on each primary.
    let candidates: Vec<String> = (0..200).map(|i| format!("p-{i}")).collect();
    let placed = owners(&cluster, &candidates).await;
    let mut ids = Vec::new();
    let mut ports = Vec::new();
    for port in cluster.ports() {
        for (id, _) in candidates
            .iter()
            .zip(&placed)
            .filter(|(_, p)| **p == port)
            .take(2)
        {
            ids.push(id.clone());
            ports.push(port);
        }
    }
    assert_eq!(ids.len(), 6);
    for id in &ids {
        env.put_product(id, "10.5").await;
    }
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();

    let (read, lines) = read_function(&env, redis.clone()).await;
    for id in &ids {
        until_hit(&read, &lines, id, Duration::from_secs(10)).await;
    }
    until_mapped(read.cache(), &keys, &ports).await;
    let batches = cache_with(&redis, &CacheSettings::default()).await;
    let ops: Vec<CacheOp> = keys.iter().map(CacheOp::delete).collect();
    for attempt in 0.. {
        assert!(attempt < 100, "the invalidator never connected");
        if batches.apply(&ops).await.is_ok() {
            break;
        }
    }
    until_mapped(&batches, &keys, &ports).await;
    for id in &ids {
        until_hit(&read, &lines, id, Duration::from_secs(5)).await;
    }

    let stalled_port = ports[0];
    let stalled = Stalled::new(cluster.node(stalled_port).unwrap());
    let on_stalled = |i: usize| ports[i] == stalled_port;

    // Reads: the other primaries' keys keep hitting; the stalled one's bypass, after a few
    // timeouts without calling it.
    let mut opened = false;
    for round in 0.. {
        assert!(round <= 3 * 3, "the stalled node's breaker never opened");
        let mut breaker_bypasses = 0;
        for (i, id) in ids.iter().enumerate() {
            let (x_cache, price, breaker_bypass) = get(&read, &lines, id).await;
            assert_eq!(price, json!(10.5), "{id}");
            if on_stalled(i) {
                assert_eq!(x_cache, "bypass", "{id} is on the stalled node");
                breaker_bypasses += breaker_bypass;
            } else {
                assert_eq!(
                    (x_cache.as_str(), breaker_bypass),
                    ("hit", 0),
                    "{id} is on a node that answers (round {round})"
                );
            }
        }
        if breaker_bypasses == 2 {
            opened = true;
            break;
        }
    }
    assert!(opened);

    // Batches: every one fails exactly the stalled node's ops and applies the others'; once
    // its breaker is open, without waiting for that node at all.
    let stalled_ops: Vec<usize> = (0..ops.len()).filter(|&i| on_stalled(i)).collect();
    let mut fast = false;
    for batch in 0.. {
        assert!(batch <= 3, "the invalidator's breaker never opened");
        for (i, key) in keys.iter().enumerate().filter(|(i, _)| !on_stalled(*i)) {
            let mut conn = node_conn(ports[i]).await;
            redis::cmd("SET")
                .arg(key)
                .arg("stale")
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
        let err = batches
            .apply(&ops)
            .await
            .expect_err("the stalled node's ops cannot succeed");
        assert_eq!(err.failed, stalled_ops, "batch {batch}: {err:?}");
        for (i, key) in keys.iter().enumerate().filter(|(i, _)| !on_stalled(*i)) {
            let mut conn = node_conn(ports[i]).await;
            let left: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(left, None, "batch {batch} did not apply {key}");
        }
        if matches!(err.source, CacheError::BreakerOpen(ref node) if *node == format!("127.0.0.1:{stalled_port}"))
        {
            fast = true;
            break;
        }
    }
    assert!(fast);

    // Resumed: the stalled node's keys hit again, and a whole batch applies.
    drop(stalled);
    for (_, id) in ids.iter().enumerate().filter(|(i, _)| on_stalled(*i)) {
        until_hit(&read, &lines, id, Duration::from_secs(5)).await;
    }
    let resumed = Instant::now();
    while batches.apply(&ops).await.is_err() {
        assert!(
            resumed.elapsed() < Duration::from_secs(5),
            "batches still fail after the node resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fencing: the breaker's trial is the first call to a node that had stopped answering, which
/// may be a primary replaced while it stalled, answering from its old data before it learns
/// so. The trial's hit is not served (the read answers from the table), though it closes the
/// breaker: the next read hits.
#[tokio::test]
async fn the_first_answer_of_a_node_that_stalled_is_not_served() {
    let breaker = BreakerSettings {
        open_for: Duration::from_millis(200),
        ..BreakerSettings::default()
    };
    let (_env, redis, read, lines) = single_node(breaker).await;
    {
        let _stalled = Stalled::new(redis.server());
        let mut reads = 0;
        while get(&read, &lines, "kb-001").await.2 == 0 {
            reads += 1;
            assert!(reads <= breaker.failures, "the breaker never opened");
        }
    }
    // Resumed, and the interval over (a time, not a condition): the next read is the trial.
    tokio::time::sleep(breaker.open_for).await;
    let (x_cache, price, breaker_bypass) = get(&read, &lines, "kb-001").await;
    assert_eq!(
        (x_cache.as_str(), &price, breaker_bypass),
        ("bypass", &json!(129.99), 1),
        "the trial's answer was served"
    );
    // The node did answer it: the document was there all along, and the breaker has closed.
    let mut conn = node_conn(redis.server().port()).await;
    let cached: Option<String> = redis::cmd("GET")
        .arg("product:kb-001")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(cached.is_some(), "the document was not cached");
    let (x_cache, _, breaker_bypass) = get(&read, &lines, "kb-001").await;
    assert_eq!((x_cache.as_str(), breaker_bypass), ("hit", 0));
}

/// Fencing for batches: a primary with no replica attached is taken at its word (a promoted
/// replica alone), except on the breaker's trial, when it may be a demoted primary that has not
/// heard yet: then the batch needs every replica configured, fails, and is delivered again; the
/// next batch, the node caught up, is acknowledged under-replicated as before.
#[tokio::test]
async fn a_stalled_nodes_first_batch_needs_every_configured_replica() {
    let primary = RedisServer::start().await.unwrap();
    let breaker = BreakerSettings {
        open_for: Duration::from_millis(200),
        ..BreakerSettings::default()
    };
    let redis = RedisSettings {
        confirm_replicas: 1,
        confirm_timeout: Duration::from_millis(200),
        breaker,
        ..RedisSettings::new(primary.url())
    };
    let batches = cache_with(&redis, &CacheSettings::default()).await;
    let ops = vec![CacheOp::delete("product:kb-001")];
    let under_replicated = |applied: &product_cache::cache::Applied| {
        applied.under_replicated.len() == 1 && applied.under_replicated[0].online == 0
    };
    let first = batches.apply(&ops).await.expect("applied");
    assert!(under_replicated(&first), "{first:?}");
    {
        let _stalled = Stalled::new(&primary);
        for batch in 0.. {
            assert!(batch <= breaker.failures, "the breaker never opened");
            let err = batches.apply(&ops).await.unwrap_err();
            if matches!(err.source, CacheError::BreakerOpen(_)) {
                break;
            }
        }
    }
    tokio::time::sleep(breaker.open_for).await;
    let trial = batches.apply(&ops).await;
    assert!(
        matches!(
            trial,
            Err(ref e) if matches!(e.source, CacheError::Unconfirmed { acked: 0, wanted: 1, .. })
        ),
        "the trial batch was acknowledged without the configured replica: {trial:?}"
    );
    let next = batches.apply(&ops).await.expect("applied");
    assert!(under_replicated(&next), "{next:?}");
}

/// Pacing: a batch refused by an open breaker fails without calling the node, but answers only
/// once that breaker admits its trial, so the batch Lambda delivers again is the trial (it calls
/// the node) rather than another instant failure: a stall spends one of the mapping's retry
/// attempts per open interval, not hundreds a second.
#[tokio::test]
async fn a_batch_refused_by_an_open_breaker_answers_when_its_trial_is_due() {
    let redis = DelayedRedis::start(Duration::ZERO).await.unwrap();
    let batches = cache_with(&RedisSettings::new(redis.url()), &CacheSettings::default()).await;
    let ops = vec![CacheOp::delete("product:kb-001")];
    batches.apply(&ops).await.expect("connected");
    let _stalled = Stalled::new(redis.server());
    for batch in 0.. {
        assert!(
            batch <= BreakerSettings::default().failures,
            "never refused"
        );
        let err = batches.apply(&ops).await.unwrap_err();
        if matches!(err.source, CacheError::BreakerOpen(_)) {
            break;
        }
    }
    // Delivered again at once: the trial, which calls the stalled node.
    let sent = redis.proxy().bytes();
    let err = batches.apply(&ops).await.unwrap_err();
    assert!(
        !matches!(err.source, CacheError::BreakerOpen(_)),
        "the refused batch answered before its breaker's trial was due: {err:?}"
    );
    assert!(redis.proxy().bytes() > sent, "the trial sent nothing");
}
