//! The functions' Redis connections themselves: TCP keepalive on every one, a topology refresh
//! under the least-privilege ACL that reconnects no node it did not have to, and a cluster that
//! reports its nodes' endpoints as unknown.

use std::collections::HashMap;
use std::time::Duration;

use local_stack::services::{RedisCluster, RedisServer};
use product_cache::cache::{Cache, CacheOp, RedisCache};
use product_cache::config::{CacheSettings, RedisSettings};

use crate::support::cache_with;

/// Keys over every slot range of a 3-node cluster (and more).
fn keys() -> Vec<String> {
    (0..300).map(|i| format!("product:k{i}")).collect()
}

/// Applies a batch over `keys()` until it succeeds (bounded).
async fn applied(cache: &RedisCache) {
    let ops: Vec<CacheOp> = keys().into_iter().map(CacheOp::delete).collect();
    for attempt in 0.. {
        match cache.apply(&ops).await {
            Ok(_) => return,
            Err(e) => assert!(attempt < 100, "the batch never applied: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every key of `keys()` until each read succeeds (bounded).
async fn read_all(cache: &RedisCache) {
    for key in keys() {
        for attempt in 0.. {
            if cache.get(&key).await.is_ok() {
                break;
            }
            assert!(attempt < 100, "{key} never read");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The established TCP connections to `port` on this machine, as `ss` shows them with their
/// timers (`-o`).
fn sockets_to(port: u16) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every connection to `ports` (made by the cache alone: the test opens none) carries a
/// keepalive timer exactly when `on`.
fn assert_keepalive(ports: &[u16], on: bool) {
    for &port in ports {
        let sockets = sockets_to(port);
        assert!(!sockets.is_empty(), "no connection to :{port}");
        for socket in &sockets {
            assert_eq!(socket.contains("timer:(keepalive"), on, ":{port}: {socket}");
        }
    }
}

/// `REDIS_TCP_KEEPALIVE_SECS`: probes on every connection, single node and every node of a
/// cluster; at 0, none (the guard off).
#[tokio::test]
async fn every_redis_connection_has_tcp_keepalive() {
    for keepalive in [Some(Duration::from_secs(30)), None] {
        let single = RedisServer::start().await.unwrap();
        let redis = RedisSettings {
            tcp_keepalive: keepalive,
            ..RedisSettings::new(single.url())
        };
        let cache = cache_with(&redis, &CacheSettings::default()).await;
        applied(&cache).await;
        read_all(&cache).await;
        assert_keepalive(&[single.port()], keepalive.is_some());

        let cluster = RedisCluster::start(3).await.unwrap();
        let redis = RedisSettings {
            cluster: true,
            tcp_keepalive: keepalive,
            ..RedisSettings::new(cluster.url())
        };
        let cache = cache_with(&redis, &CacheSettings::default()).await;
        applied(&cache).await;
        read_all(&cache).await;
        assert_keepalive(&cluster.ports(), keepalive.is_some());
    }
}

/// `total_connections_received` of every node, read over `admin`, connections opened before.
async fn connections_received(
    admin: &mut HashMap<u16, redis::aio::MultiplexedConnection>,
) -> HashMap<u16, i64> {
    let mut received = HashMap::new();
    for (&port, conn) in admin.iter_mut() {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(conn)
            .await
            .unwrap();
        let n = info
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        received.insert(port, n);
    }
    received
}

/// A failover of one shard seen by a cache connected as a user with `rules`: the connections
/// each node of the other shards received meanwhile, by port.
async fn reconnections_through_a_failover(rules: &str) -> Vec<(u16, i64)> {
    let cluster = RedisCluster::start_with_replicas(3, 1).await.unwrap();
    let mut admin = HashMap::new();
    for port in cluster.ports() {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut setuser = redis::cmd("ACL");
        setuser
            .arg("SETUSER")
            .arg("product-cache")
            .arg("on")
            .arg(">pw");
        for rule in rules.split_whitespace() {
            setuser.arg(rule);
        }
        setuser.query_async::<()>(&mut conn).await.unwrap();
        admin.insert(port, conn);
    }
    let entry = cluster.ports()[0];
    let redis = RedisSettings {
        cluster: true,
        confirm_replicas: 1,
        ..RedisSettings::new(format!("redis://product-cache:pw@127.0.0.1:{entry}"))
    };
    let cache = cache_with(&redis, &CacheSettings::default()).await;
    applied(&cache).await;
    read_all(&cache).await;

    let primary = cluster.primary_except(&[entry]).await.unwrap();
    let replica = cluster.replica_of(primary).await.unwrap();
    let before = connections_received(&mut admin).await;
    // Over the admin connections: `RedisCluster::failover` would open new ones to every node
    // while it waits.
    let conn = admin.get_mut(&replica).unwrap();
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async::<()>(conn)
        .await
        .unwrap();
    for attempt in 0.. {
        assert!(attempt < 200, "the failover never completed");
        let mut done = true;
        for (&port, conn) in admin.iter_mut() {
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(conn)
                .await
                .unwrap();
            let state: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(conn)
                .await
                .unwrap();
            let expected = match port {
                p if p == replica => Some("role:master"),
                p if p == primary => Some("role:slave"),
                _ => None,
            };
            done &= state.contains("cluster_state:ok") && expected.is_none_or(|e| role.contains(e));
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reads of the failed-over shard's keys meet MOVED from the demoted node, and the client
    // refreshes its topology, checking every connection it holds.
    read_all(&cache).await;
    applied(&cache).await;
    read_all(&cache).await;
    let after = connections_received(&mut admin).await;
    let mut unchanged: Vec<(u16, i64)> = before
        .iter()
        .filter(|(&port, _)| port != primary && port != replica)
        .map(|(&port, &n)| (port, after[&port] - n))
        .collect();
    unchanged.sort_unstable();
    unchanged
}

/// Under the documented ACL, a failover of one shard reconnects no node of the other shards.
/// The rules grant no `PING` (the cache's topology never checks a connection with one; the
/// cluster client it replaced did, and reconnected every node whose `PING` was refused, exactly
/// during failovers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_reconnects_no_other_shard_under_the_least_privilege_user() {
    let rules = product_cache::acl::rules("product:");
    assert!(!rules.contains("ping"), "{rules}");
    let deltas = reconnections_through_a_failover(&rules).await;
    assert_eq!(deltas.len(), 4);
    assert!(
        deltas.iter().all(|&(_, n)| n == 0),
        "nodes of unchanged shards were reconnected: {deltas:?}"
    );
}

/// A cluster that reports every endpoint as NULL (`cluster-preferred-endpoint-type
/// unknown-endpoint`: "the node you asked"): the slot map resolves them to the node asked, and
/// a batch over every shard applies (with each pipeline sent to its own primary).
#[tokio::test]
async fn a_batch_applies_on_a_cluster_that_reports_unknown_endpoints() {
    let cluster = RedisCluster::start_with(
        3,
        &["--cluster-preferred-endpoint-type", "unknown-endpoint"],
    )
    .await
    .unwrap();
    let client = redis::Client::open(cluster.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let slots: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(format!("{slots:?}").contains("nil"), "{slots:?}");
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    let cache = cache_with(&redis, &CacheSettings::default()).await;
    applied(&cache).await;
    let ops: Vec<CacheOp> = keys().into_iter().map(CacheOp::delete).collect();
    cache.apply(&ops).await.unwrap();
}
