//! A Lambda environment frozen between invocations, for minutes: meanwhile the server (or the
//! network path) may close its idle connections, and the thawed environment holds dead ones.
//! The next invocation must be served as usual: a read from the cache, a batch applied.

use product_cache::config::InvalidationMode::*;
use product_cache::config::RedisSettings;
use product_cache::read::CacheStatus;

use crate::support::{connected, fixture, fresh, TestEnv};

/// Closes every client connection of the servers at `ports` but the caller's own.
async fn kill_clients(ports: &[u16]) {
    for port in ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            killed >= 1 || ports.len() > 1,
            "no connection to kill on {port}"
        );
    }
}

/// Both functions over `redis`: a read fills, the connections are killed, the next read must be
/// a hit; a batch is applied, the connections are killed, the next batch must be applied.
async fn survive_dead_connections(env: &mut TestEnv, redis: RedisSettings, ports: &[u16]) {
    let (read, invalidator) = crate::support::both_functions(env, redis, Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.new_stream_event().await;
    // Let both connect before the freeze.
    let event = fresh(fixture("modify.json"));
    connected(&read, &invalidator, &event).await;

    kill_clients(ports).await;
    assert_eq!(
        read.get("kb-001").await.0,
        CacheStatus::Hit,
        "the thawed read bypassed"
    );
    kill_clients(ports).await;
    let response = invalidator.handle(event).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "the thawed batch failed: {response:?}"
    );
}

#[tokio::test]
async fn both_functions_survive_killed_connections_on_a_single_node() {
    let mut env = TestEnv::new(Delete).await;
    let redis = RedisSettings::new(env.redis.url());
    let port = env.redis.port();
    survive_dead_connections(&mut env, redis, &[port]).await;
}

#[tokio::test]
async fn both_functions_survive_killed_connections_on_a_cluster() {
    let cluster = local_stack::services::RedisCluster::start(3).await.unwrap();
    let mut env = TestEnv::new(Delete).await;
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    survive_dead_connections(&mut env, redis, &cluster.ports()).await;
}

/// The server closes connections idle for longer than its `timeout` (1 s here), as an idle
/// Lambda environment's are; the next read and batch must not notice.
async fn survive_the_idle_timeout(env: &mut TestEnv, redis: RedisSettings, ports: &[u16]) {
    let (read, invalidator) = crate::support::both_functions(env, redis, Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.new_stream_event().await;
    let event = fresh(fixture("modify.json"));
    connected(&read, &invalidator, &event).await;
    // Wait (bounded) until every server has closed the idle connections: only ours is left.
    for port in ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let started = std::time::Instant::now();
        loop {
            let look = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("CLIENT")
                    .arg(&["LIST", "TYPE", "normal"][..])
                    .query_async::<String>(&mut conn)
                    .await
            };
            // Bounded: the server closes idle connections, ours too if it were slow.
            let list = tokio::time::timeout(std::time::Duration::from_secs(2), look)
                .await
                .map_or_else(|_| String::new(), |r| r.unwrap_or_default());
            if list.lines().count() == 1 {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{list}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    assert_eq!(
        read.get("kb-001").await.0,
        CacheStatus::Hit,
        "the thawed read bypassed"
    );
    let response = invalidator.handle(event).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "the thawed batch failed: {response:?}"
    );
}

#[tokio::test]
async fn both_functions_survive_the_servers_idle_timeout() {
    let mut env = TestEnv::new(Delete).await;
    let idle = local_stack::services::RedisServer::start_with(&["--timeout", "1"])
        .await
        .unwrap();
    let redis = RedisSettings::new(idle.url());
    survive_the_idle_timeout(&mut env, redis, &[idle.port()]).await;
}
