//! Replicas: a batch is acknowledged only once replicas hold its writes (`WAIT`), so a failover
//! cannot lose an invalidation Lambda was told had been applied.

use local_stack::services::RedisServer;
use product_cache::config::RedisSettings;
use product_cache::config::{CacheSettings, InvalidationMode::*, InvalidatorSettings};
use product_cache::invalidate::Invalidator;
use serde_json::json;

use crate::support::{fixture, fresh, TestEnv};

/// Waits (bounded) until `replica` reports its link to the primary up.
async fn linked(replica: &RedisServer) {
    let client = redis::Client::open(replica.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..100 {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
        let state = role
            .get(3)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
        if state.as_deref() == Some("connected") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the replica never connected");
}

/// A replica of `env`'s Redis, once its link is up.
async fn replica_of(env: &TestEnv) -> RedisServer {
    // A replica's first sync waits 5 s by default, for more replicas to share it.
    let mut primary = env.redis_conn().await;
    redis::cmd("CONFIG")
        .arg(&["SET", "repl-diskless-sync-delay", "0"][..])
        .query_async::<()>(&mut primary)
        .await
        .unwrap();
    let port = env.redis.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port])
        .await
        .unwrap();
    linked(&replica).await;
    replica
}

#[tokio::test]
async fn a_batch_is_acknowledged_only_once_its_replicas_confirm_it() {
    let env = TestEnv::new(Delete).await;
    let mut replica = replica_of(&env).await;
    let invalidator = |confirm_replicas| {
        let settings = InvalidatorSettings {
            redis: RedisSettings {
                confirm_replicas,
                confirm_timeout: std::time::Duration::from_millis(200),
                ..RedisSettings::new(env.redis.url())
            },
            mode: Delete,
            cache: CacheSettings::default(),
        };
        Invalidator::build(settings, &env.sdk)
    };
    let confirmed = invalidator(1).await.unwrap();
    let event = fresh(fixture("batch-mixed.json"));
    let first = event["Records"][0]["dynamodb"]["SequenceNumber"].clone();
    let mut attempts = 0;
    while !confirmed
        .handle(event.clone())
        .await
        .batch_item_failures
        .is_empty()
    {
        attempts += 1;
        assert!(attempts < 50, "never connected");
    }

    // The replica is gone: its primary still applies the batch, but nothing confirms it, so
    // Lambda is told to retry it from its first record.
    replica.stop().await;
    let response = serde_json::to_value(confirmed.handle(event.clone()).await).unwrap();
    assert_eq!(
        response,
        json!({"batchItemFailures": [{"itemIdentifier": first}]})
    );
    // Without confirmation, the same batch is acknowledged: what a failover could lose.
    let unconfirmed = invalidator(0).await.unwrap();
    let mut attempts = 0;
    while !unconfirmed
        .handle(event.clone())
        .await
        .batch_item_failures
        .is_empty()
    {
        attempts += 1;
        assert!(attempts < 50, "never connected");
    }
    // The replica is back and catches up: the batch is confirmed again.
    replica.restart().await.unwrap();
    linked(&replica).await;
    let response = confirmed.handle(event).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
}

/// An asynchronous-replication failover: the replica's link is cut (its stream held in a proxy),
/// the item changes, the primary dies and the replica is promoted behind the same endpoint
/// (ElastiCache's primary endpoint moving to the promoted node). With confirmation, the
/// invalidation was never acknowledged, Lambda delivers it again, and it lands on the new
/// primary. Without, it was acknowledged and lost with the old primary: the old price stays.
async fn failover_after_an_unreplicated_change(confirm_replicas: u32) -> serde_json::Value {
    use local_stack::proxy::DelayProxy;

    let mut env = TestEnv::new(Delete).await;
    let mut primary_conn = env.redis_conn().await;
    redis::cmd("CONFIG")
        .arg(&["SET", "repl-diskless-sync-delay", "0"][..])
        .query_async::<()>(&mut primary_conn)
        .await
        .unwrap();
    let primary = (std::net::Ipv4Addr::LOCALHOST, env.redis.port()).into();
    let link = DelayProxy::start(primary, std::time::Duration::ZERO)
        .await
        .unwrap();
    let link_port = link.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &link_port])
        .await
        .unwrap();
    linked(&replica).await;
    let endpoint = DelayProxy::start(primary, std::time::Duration::ZERO)
        .await
        .unwrap();
    let redis = RedisSettings {
        confirm_replicas,
        confirm_timeout: std::time::Duration::from_millis(200),
        ..RedisSettings::new(endpoint.redis_url())
    };
    let (read, invalidator) = crate::support::both_functions(&env, redis, Delete).await;

    env.put_product("kb-001", "129.99").await;
    env.new_stream_event().await;
    for attempt in 0.. {
        assert!(attempt < 100, "never connected");
        if read.get("kb-001").await.0 == product_cache::read::CacheStatus::Hit {
            break;
        }
    }
    // The replica holds the cached price, then its link stalls.
    let client = redis::Client::open(replica.url()).unwrap();
    let mut replica_conn = client.get_multiplexed_async_connection().await.unwrap();
    for attempt in 0.. {
        assert!(attempt < 100, "the replica never caught up");
        let cached: Option<String> = redis::cmd("GET")
            .arg("product:kb-001")
            .query_async(&mut replica_conn)
            .await
            .unwrap();
        if cached.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    link.set_delay(std::time::Duration::from_secs(3600));

    env.put_product("kb-001", "99.99").await;
    let change = env.new_stream_event().await;
    let first = invalidator.handle(change.clone()).await;

    // Failover: the primary dies, the replica is promoted, the endpoint follows it.
    env.redis.stop().await;
    redis::cmd("REPLICAOF")
        .arg(&["NO", "ONE"][..])
        .query_async::<()>(&mut replica_conn)
        .await
        .unwrap();
    endpoint.set_upstream((std::net::Ipv4Addr::LOCALHOST, replica.port()).into());
    // As ElastiCache replaces the lost node: a new replica of the promoted one.
    redis::cmd("CONFIG")
        .arg(&["SET", "repl-diskless-sync-delay", "0"][..])
        .query_async::<()>(&mut replica_conn)
        .await
        .unwrap();
    let promoted = replica.port().to_string();
    let replacement = RedisServer::start_with(&["--replicaof", "127.0.0.1", &promoted])
        .await
        .unwrap();
    linked(&replacement).await;
    // Lambda delivers the batch again only if it was reported failed.
    if !first.batch_item_failures.is_empty() {
        for attempt in 0.. {
            assert!(attempt < 100, "the retried batch never landed");
            if invalidator
                .handle(change.clone())
                .await
                .batch_item_failures
                .is_empty()
            {
                break;
            }
        }
    }
    let mut price = None;
    for attempt in 0.. {
        assert!(attempt < 100, "never read through the new primary");
        let (status, lookup) = read.get("kb-001").await;
        if status != product_cache::read::CacheStatus::Bypass {
            let product_cache::read::Lookup::Found(doc) = lookup.unwrap() else {
                panic!("the item exists");
            };
            let doc: serde_json::Value = serde_json::from_str(doc.as_str()).unwrap();
            price = Some(doc["price"].clone());
            break;
        }
    }
    price.unwrap()
}

#[tokio::test]
async fn a_failover_loses_no_acknowledged_invalidation() {
    assert_eq!(failover_after_an_unreplicated_change(1).await, json!(99.99));
    // Confirmation off: the invalidation was acknowledged, lost with the old primary, and the
    // old price is served from the promoted replica until its TTL.
    assert_eq!(
        failover_after_an_unreplicated_change(0).await,
        json!(129.99)
    );
}

/// What confirming a batch on a replica costs: a 1,000-key batch with and without `WAIT`, on a
/// primary with one local replica. A measurement, not a test (`--ignored`), for the README:
/// `cargo test --release -p integration-tests --test it replicas::confirmation_cost -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement; run it with --ignored --nocapture"]
async fn confirmation_cost() {
    let env = TestEnv::new(Delete).await;
    let _replica = replica_of(&env).await;
    let template = fresh(fixture("modify.json"))["Records"][0].clone();
    let batch = |round: usize| {
        let records: Vec<serde_json::Value> = (0..1000)
            .map(|i| {
                let mut r = template.clone();
                r["dynamodb"]["Keys"]["productId"] = json!({"S": format!("p{i}")});
                r["dynamodb"]["SequenceNumber"] = json!(format!("{}", 1_000_000 * (round + 1) + i));
                r
            })
            .collect();
        json!({ "Records": records })
    };
    for confirm_replicas in [0, 1, 0, 1] {
        let settings = InvalidatorSettings {
            redis: RedisSettings {
                confirm_replicas,
                ..RedisSettings::new(env.redis.url())
            },
            mode: Delete,
            cache: CacheSettings::default(),
        };
        let invalidator = Invalidator::build(settings, &env.sdk).await.unwrap();
        assert!(invalidator
            .handle(batch(0))
            .await
            .batch_item_failures
            .is_empty());
        let mut times = Vec::new();
        for round in 1..=50 {
            let started = std::time::Instant::now();
            let response = invalidator.handle(batch(round)).await;
            times.push(started.elapsed());
            assert!(response.batch_item_failures.is_empty());
        }
        times.sort();
        println!(
            "confirm_replicas={confirm_replicas}: 1,000-key batch p50 {:?}, p90 {:?}",
            times[25], times[45]
        );
    }
}
