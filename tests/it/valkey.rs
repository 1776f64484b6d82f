//! The engine the template deploys: Valkey (ElastiCache's Valkey 8.0; here the `valkey-server`
//! scripts/setup.sh pins). Most tests run on Debian's Redis OSS 7.0; these run the scenarios
//! that depend on the server's behaviour on Valkey too: the scripts (leases dated by `TIME`, the
//! apply script reading `INFO stats`) under the least-privilege user and its first-argument
//! `INFO` rules, the eviction guard on a full node, and a batch confirmed by a replica (`WAIT`,
//! `INFO replication`), and a cluster of Valkey nodes with replicas. The consistency checker's
//! Valkey runs are in checker.rs.

use std::time::Duration;

use local_stack::services::{Engine, RedisCluster, RedisServer};
use product_cache::cache::{BatchError, Cache, CacheError, CacheOp, OpKind, UnderReplicated};
use product_cache::config::{CacheSettings, InvalidationMode::Delete, RedisSettings};

use crate::support::{
    both_functions, cache_with, connected, fixture, fresh, info_field, linked, TestEnv,
};

const USER: &str = "product-cache";
const PASSWORD: &str = "valkey-test";

/// The functions' user with exactly `product_cache::acl::rules`, as `valkey-server` arguments.
fn least_privilege_user() -> Vec<String> {
    let mut args: Vec<String> = ["--user", USER, "on"].map(String::from).to_vec();
    args.push(format!(">{PASSWORD}"));
    args.extend(
        product_cache::acl::rules(&CacheSettings::default().key_prefix)
            .split_whitespace()
            .map(String::from),
    );
    args
}

/// A Valkey node that knows the functions' user, started with `extra` arguments too.
async fn valkey_with_user(extra: &[&str]) -> RedisServer {
    let mut args = least_privilege_user();
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::start_engine(Engine::Valkey, &args)
        .await
        .expect("valkey-server starts")
}

/// `url` as the functions' user.
fn as_user(url: &str) -> String {
    url.replacen("redis://", &format!("redis://{USER}:{PASSWORD}@"), 1)
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The server really is Valkey (a `valkey-server` on `PATH` or `$VALKEY_SERVER` could be
/// anything), of the major version setup.sh pins, and the functions' user gets exactly the
/// `INFO` sections its first-argument rules (`+info|stats`, `+info|replication`) allow: Redis 7
/// deprecates that form for commands without subcommands, and a Valkey that dropped it would
/// refuse the eviction guard's `INFO stats` (refreshes would all become deletes) and a confirmed
/// batch's `INFO replication`. `evicted_keys`, which the guard reads, is in Valkey's `stats`.
#[tokio::test]
async fn valkey_grants_the_functions_user_its_info_sections() {
    let valkey = valkey_with_user(&[]).await;
    let mut admin = connection(&valkey.url()).await;
    let server = info(&mut admin, &["server"]).await.unwrap();
    assert!(server.contains("server_name:valkey"), "{server}");
    assert!(server.contains("valkey_version:8."), "{server}");

    let mut user = connection(&as_user(&valkey.url())).await;
    assert_eq!(
        info_field(&mut user, "stats", "evicted_keys").await,
        Some(0)
    );
    let replication = info(&mut user, &["replication"]).await.unwrap();
    assert!(replication.contains("role:master"), "{replication}");
    // Every other section, and all of them at once, stays refused.
    for sections in [&[][..], &["server"], &["memory"], &["all"]] {
        let refused = info(&mut user, sections).await.unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{sections:?}: {refused}");
    }
}

/// `INFO` of `sections` (none: the default set).
async fn info(
    conn: &mut redis::aio::MultiplexedConnection,
    sections: &[&str],
) -> redis::RedisResult<String> {
    redis::cmd("INFO").arg(sections).query_async(conn).await
}

/// Both functions, both modes, under the least-privilege user on a Valkey node: reads miss,
/// fill and hit (the lease scripts and their `TIME`), and a change deletes (delete mode) or
/// refreshes (refresh mode: the apply script's `INFO stats` allowed, or it would delete).
#[tokio::test]
async fn both_functions_work_under_the_least_privilege_user_on_valkey() {
    crate::failure_paths::both_functions_under_the_least_privilege_user_on(Engine::Valkey).await;
}

/// Issue 20's reproduction on a full Valkey node (the template's `volatile-ttl`): an older
/// change delivered again after evictions never writes its document back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_change_delivered_again_after_evictions_never_writes_back_on_valkey() {
    crate::eviction::older_changes_never_write_back_after_evictions_on(Engine::Valkey).await;
}

/// While a full Valkey node evicts (its `evicted_keys` moving), refreshes delete; past the
/// clock margin they refresh again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_delete_while_the_node_evicts_on_valkey() {
    crate::eviction::refreshes_delete_while_the_node_evicts_on(Engine::Valkey).await;
}

/// A Valkey primary with a Valkey replica, the functions' user, `REDIS_CONFIRM_REPLICAS=1`: a
/// batch (a refresh through the apply script, a delete without it) is confirmed by the replica
/// (`WAIT`), which then holds its writes; a stalled replica fails the batch (unconfirmed); with
/// the replica gone, batches are acknowledged and reported under-replicated (`INFO replication`
/// read as the user).
#[tokio::test]
async fn a_batch_is_confirmed_by_a_valkey_replica() {
    // A replica's first sync otherwise waits 5 s for more replicas to share it.
    let primary = valkey_with_user(&["--repl-diskless-sync-delay", "0"]).await;
    let port = primary.port().to_string();
    let mut replica = valkey_with_user(&["--replicaof", "127.0.0.1", &port]).await;
    linked(&replica).await;
    crate::replicas::await_online(primary.port(), 1).await;
    let redis = RedisSettings {
        confirm_replicas: 1,
        confirm_timeout: Duration::from_millis(200),
        ..RedisSettings::new(as_user(&primary.url()))
    };
    let cache = cache_with(&redis, &CacheSettings::default()).await;
    let ops = [
        CacheOp {
            kind: OpKind::Set {
                value: r#"{"price":1}"#.into(),
                ttl: Duration::from_secs(60),
            },
            ..CacheOp::delete("product:refreshed")
        },
        CacheOp::delete("product:deleted"),
    ];
    // The client connects in the background: its first batches may fail for that alone.
    for attempt in 0.. {
        if cache.apply(&ops[..1]).await.is_ok() {
            break;
        }
        assert!(attempt < 50, "never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for op in &ops {
        let applied = cache.apply(std::slice::from_ref(op)).await.unwrap();
        assert_eq!(applied.under_replicated, vec![], "{op:?}");
    }
    // Confirmed means held: the replica has the refresh's document without waiting.
    let mut on_replica = connection(&replica.url()).await;
    let held: Option<String> = redis::cmd("GET")
        .arg("product:refreshed")
        .query_async(&mut on_replica)
        .await
        .unwrap();
    assert_eq!(held.as_deref(), Some(r#"{"price":1}"#));

    // Stalled: still attached as far as the primary knows, it cannot acknowledge. One batch
    // after the other: a `WAIT` holds its connection.
    let pid = replica.pid().expect("the replica runs") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let mut stalled = Vec::new();
    for op in &ops {
        stalled.push(cache.apply(std::slice::from_ref(op)).await.map(drop));
    }
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    for outcome in stalled {
        assert!(
            matches!(
                outcome,
                Err(BatchError {
                    source: CacheError::Unconfirmed {
                        acked: 0,
                        wanted: 1,
                        ..
                    },
                    ..
                })
            ),
            "{outcome:?}"
        );
    }

    // Gone: acknowledged, and reported short of its replica.
    replica.stop().await;
    crate::replicas::await_online(primary.port(), 0).await;
    let short = UnderReplicated {
        node: format!("127.0.0.1:{}", primary.port()),
        online: 0,
        wanted: 1,
    };
    for op in &ops {
        let applied = cache.apply(std::slice::from_ref(op)).await.unwrap();
        assert_eq!(applied.under_replicated, vec![short.clone()], "{op:?}");
    }
}

/// A cluster of Valkey nodes, 3 primaries with a replica each (created by `valkey-cli --cluster
/// create`), under the least-privilege user, every batch confirmed by each primary's replica and
/// hits read from replicas: both functions find the nodes through the slot map (`CLUSTER SLOTS`,
/// and each primary's replicas in `INFO replication`, as the user), a read fills and then hits,
/// and once a change's batch is acknowledged the next read misses, its replica holding the
/// delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_functions_work_on_a_valkey_cluster_with_replicas() {
    let user = least_privilege_user();
    let user: Vec<&str> = user.iter().map(String::as_str).collect();
    let cluster = RedisCluster::start_engine(Engine::Valkey, 3, 1, &user)
        .await
        .expect("a cluster of valkey-servers starts");
    let mut env = TestEnv::new(Delete).await;
    let redis = RedisSettings {
        cluster: true,
        confirm_replicas: 1,
        read_from_replicas: true,
        ..RedisSettings::new(as_user(&cluster.url()))
    };
    let (read, invalidator) = both_functions(&env, redis, Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.new_stream_event().await;
    connected(&read, &invalidator, &fresh(fixture("modify.json"))).await;
}
