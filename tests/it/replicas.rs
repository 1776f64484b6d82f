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

#[tokio::test]
async fn a_batch_is_acknowledged_only_once_its_replicas_confirm_it() {
    let env = TestEnv::new(Delete).await;
    // A replica's first sync waits 5 s by default, for more replicas to share it.
    let mut primary = env.redis_conn().await;
    redis::cmd("CONFIG")
        .arg(&["SET", "repl-diskless-sync-delay", "0"][..])
        .query_async::<()>(&mut primary)
        .await
        .unwrap();
    let port = env.redis.port().to_string();
    let mut replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port])
        .await
        .unwrap();
    linked(&replica).await;
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
