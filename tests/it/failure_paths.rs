//! The failure paths a production incident finds first: a reader that took a lease and then
//! cannot fill, and what the next reader of the key pays for it.

use std::sync::atomic::{AtomicUsize, Ordering};

use local_stack::services::{Engine, RedisServer};
use product_cache::config::{CacheSettings, InvalidationMode::*};
use product_cache::id::ProductId;
use product_cache::read::{CacheStatus, ReadError, ReadPath};
use product_cache::store::{DynamoStore, Item, ProductStore, StoreError};
use serde_json::json;

use crate::support::TestEnv;

/// The table through the real store, except that the reads it is told to fail, fail (a
/// DynamoDB brownout), and that it can answer with an older item than the table holds (what an
/// eventually consistent read, or a replica lagging, returns).
struct Faulty {
    inner: DynamoStore,
    fail_first: AtomicUsize,
    stale: Option<Item>,
}

impl ProductStore for Faulty {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        let failing = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError("injected: the table is browning out".into()));
        }
        match &self.stale {
            Some(item) => Ok(Some(item.clone())),
            None => self.inner.get(id).await,
        }
    }
}

fn lease_of(id: &str) -> String {
    format!("{{product:{id}}}:lease")
}

#[tokio::test]
async fn a_failed_table_read_hands_its_lease_back() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    // A lease far longer than the test, so only handing it back can free it.
    let settings = CacheSettings {
        lease: std::time::Duration::from_secs(60),
        lease_wait: std::time::Duration::from_millis(300),
        ..CacheSettings::default()
    };
    let store = Faulty {
        inner: env.store(&settings),
        fail_first: AtomicUsize::new(1),
        stale: None,
    };
    let read = ReadPath::new(env.cache(&settings).await, store, settings);
    let (status, result) = read.get("kb-001").await;
    assert_eq!(status, CacheStatus::Miss);
    assert!(matches!(result, Err(ReadError::Store(_))));
    assert_eq!(
        env.raw_get(&lease_of("kb-001")).await,
        None,
        "the lease was kept"
    );
    // The table is back: the next reader takes the lease at once and fills. Had the lease been
    // kept, it would have waited, answered from the table without filling, and left no entry.
    let (status, result) = read.get("kb-001").await;
    assert_eq!(status, CacheStatus::Miss);
    assert!(result.is_ok());
    let cached = env.raw_get("product:kb-001").await.expect("filled");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&cached).unwrap()["price"],
        json!(129.99)
    );
}

#[tokio::test]
async fn a_fill_refused_as_older_hands_its_lease_back() {
    let settings = CacheSettings {
        version_attribute: Some("version".into()),
        lease: std::time::Duration::from_secs(60),
        ..CacheSettings::default()
    };
    let mut env = TestEnv::with_settings(Refresh, settings.clone()).await;
    let put = |version: &'static str, price: &'static str| {
        env.put_json(json!({
            "productId": {"S": "kb-001"}, "version": {"N": version}, "price": {"N": price}
        }))
    };
    put("1", "129.99").await;
    let stale: Item = serde_json::from_value(json!({
        "productId": {"S": "kb-001"}, "version": {"N": "1"}, "price": {"N": "129.99"}
    }))
    .unwrap();
    put("2", "99.99").await;
    env.drain_stream().await;
    // Version 2 is cached and then evicted; only `{key}:ver` remembers it.
    env.raw_del("product:kb-001").await;
    let store = Faulty {
        inner: env.store(&settings),
        fail_first: AtomicUsize::new(0),
        stale: Some(stale),
    };
    let read = ReadPath::new(env.cache(&settings).await, store, settings);
    assert_eq!(read.get("kb-001").await.0, CacheStatus::Miss);
    assert_eq!(
        env.raw_get("product:kb-001").await,
        None,
        "an older version was filled"
    );
    assert_eq!(
        env.raw_get(&lease_of("kb-001")).await,
        None,
        "the lease was kept"
    );
}

/// Both functions, both modes, under exactly the ACL docs/deploying.md documents: a user allowed only
/// the commands and keys in `product_cache::acl::rules` (`INFO` only for its replication and
/// stats sections, no `CONFIG`).
#[tokio::test]
async fn both_functions_work_under_the_documented_least_privilege_user() {
    both_functions_under_the_least_privilege_user_on(Engine::Redis).await;
}

/// [`both_functions_work_under_the_documented_least_privilege_user`] with the functions' node
/// running `engine`'s server (the table and its stream are the test environment's).
pub(crate) async fn both_functions_under_the_least_privilege_user_on(engine: Engine) {
    use product_cache::config::{InvalidatorSettings, ReadSettings, RedisSettings};
    use product_cache::invalidate::Invalidator;

    let rules = product_cache::acl::rules("product:");
    let mut user = vec!["--user", "product-cache", "on", ">s3cret"];
    user.extend(rules.split(' '));
    for mode in [Delete, Refresh] {
        let mut env = TestEnv::new(mode).await;
        let restricted = RedisServer::start_engine(engine, &user).await.unwrap();
        let redis = RedisSettings::new(format!(
            "redis://product-cache:s3cret@127.0.0.1:{}",
            restricted.port()
        ));
        // The user really is restricted.
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: redis::RedisResult<String> = redis::cmd("INFO").query_async(&mut conn).await;
        let refused = info.unwrap_err().to_string();
        assert!(
            refused.to_lowercase().contains("no permissions"),
            "{refused}"
        );

        let settings = env.settings.clone();
        let read = ReadSettings::new(redis.clone(), &env.table, settings.clone());
        let read = ReadPath::build(read, &env.sdk).await.unwrap();
        let invalidator = InvalidatorSettings {
            redis,
            mode,
            cache: settings,
        };
        let invalidator = Invalidator::build(invalidator, &env.sdk).await.unwrap();

        if mode == Refresh {
            // Through the same user: a fresh Redis, so refreshes write from the first record.
            crate::support::declared_empty(invalidator.cache()).await;
        }
        env.put_product("kb-001", "129.99").await;
        env.new_stream_event().await;
        let (status, result) = read.get("kb-001").await;
        assert_eq!(
            (status, result.is_ok()),
            (CacheStatus::Miss, true),
            "{mode:?}"
        );
        assert_eq!(read.get("kb-001").await.0, CacheStatus::Hit, "{mode:?}");
        env.put_product("kb-001", "99.99").await;
        let event = env.new_stream_event().await;
        let response = invalidator.handle(event).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "{mode:?}: {response:?}"
        );
        // Delete mode removed the entry; refresh mode wrote the new one.
        let (status, result) = read.get("kb-001").await;
        let expected = if mode == Delete {
            CacheStatus::Miss
        } else {
            CacheStatus::Hit
        };
        assert_eq!((status, result.is_ok()), (expected, true), "{mode:?}");
        let cached: Option<String> = redis::cmd("GET")
            .arg("product:kb-001")
            .query_async(&mut conn)
            .await
            .unwrap();
        let cached: serde_json::Value = serde_json::from_str(&cached.expect("cached")).unwrap();
        assert_eq!(cached["price"], json!(99.99), "{mode:?}");
    }
}

/// A proxy that holds every new connection for `stall` before it forwards anything, as a slow
/// DNS lookup, TLS handshake and AUTH on a small Lambda would; after that, bytes pass freely.
async fn slow_to_connect(
    upstream: u16,
    stall: std::time::Duration,
) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(stall).await;
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await;
                if let Ok(mut server) = server {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, task)
}

/// At the default timeouts (100 ms per call), a connection that takes 400 ms to form still
/// forms: it has its own budget and runs in the background, so the reads meanwhile bypass, and
/// then the cache serves. Had the connect been bounded by the call's timeout and thrown away
/// with it, every read would bypass forever.
#[tokio::test]
async fn a_connection_slower_than_the_call_timeout_still_forms() {
    use product_cache::config::{InvalidatorSettings, ReadSettings, RedisSettings};
    use product_cache::invalidate::Invalidator;

    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let stall = std::time::Duration::from_millis(400);
    let (port, _proxy) = slow_to_connect(env.redis.port(), stall).await;
    let redis = RedisSettings::new(format!("redis://127.0.0.1:{port}"));
    let settings = CacheSettings::default();
    let read = ReadSettings::new(redis.clone(), &env.table, settings.clone());
    let read = ReadPath::build(read, &env.sdk).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let (status, result) = read.get("kb-001").await;
        assert!(result.is_ok());
        statuses.push(status);
        if status == CacheStatus::Hit {
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&CacheStatus::Bypass), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&CacheStatus::Hit), "{statuses:?}");

    // The invalidator: a batch waits for the forming connection (up to the connect budget)
    // rather than fail and wait for Lambda's retry.
    let invalidator = InvalidatorSettings {
        redis,
        mode: Delete,
        cache: settings,
    };
    let invalidator = Invalidator::build(invalidator, &env.sdk).await.unwrap();
    let event = crate::support::fresh(crate::support::fixture("modify.json"));
    let response = invalidator.handle(event).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(env.raw_get("product:kb-001").await, None);
}

/// A user allowed every command but `@dangerous` ones, which include `INFO` (as a managed Redis
/// may hand out): the refresh-mode invalidator cannot read the node's eviction count, so its
/// eviction guard is blind. It fails safe, not the batch: the refresh is applied as a delete
/// (right whatever the record is), the next read fills the new item from the table, and the
/// batch's metrics line counts it (`BatchesEvictionGuardBlind`). Had the script's `INFO`
/// raised, every refresh batch would fail until Lambda gave its records up. Delete mode, which
/// never needs the count, works unchanged under the same user.
#[tokio::test]
async fn refresh_mode_without_info_applies_refreshes_as_deletes_and_says_so() {
    use std::sync::{Arc, Mutex};

    use product_cache::config::{InvalidatorSettings, ReadSettings, RedisSettings};
    use product_cache::invalidate::Invalidator;
    use product_cache::metrics::{MetricsSettings, Sink};

    let user = [
        "--user",
        "no-info",
        "on",
        ">s3cret",
        "+@all",
        "-@dangerous",
        "~*",
        "&*",
    ];
    for mode in [Refresh, Delete] {
        let mut env = TestEnv::new(mode).await;
        let server = local_stack::services::RedisServer::start_with(&user)
            .await
            .unwrap();
        let redis = RedisSettings::new(format!(
            "redis://no-info:s3cret@127.0.0.1:{}",
            server.port()
        ));
        // The user really may not run INFO, not even its stats section.
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut restricted = client.get_multiplexed_async_connection().await.unwrap();
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut restricted)
            .await;
        let refused = info.unwrap_err().to_string();
        assert!(
            refused.to_lowercase().contains("no permissions"),
            "{refused}"
        );
        // What is really in Redis, through the default user.
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let cached_price = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                let cached: Option<String> = redis::cmd("GET")
                    .arg("product:kb-001")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                cached.map(|c| {
                    serde_json::from_str::<serde_json::Value>(&c).unwrap()["price"].clone()
                })
            }
        };

        let read = ReadSettings::new(redis.clone(), &env.table, env.settings.clone());
        let read = ReadPath::build(read, &env.sdk).await.unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let invalidator = InvalidatorSettings {
            redis,
            mode,
            cache: env.settings.clone(),
        };
        let invalidator = Invalidator::build(invalidator, &env.sdk)
            .await
            .unwrap()
            .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
        if mode == Refresh {
            // A fresh Redis: without the guard's blindness, refreshes would write.
            crate::support::declared_empty(invalidator.cache()).await;
        }

        // The INSERT: a refresh in refresh mode, applied (as a delete) without failing.
        env.put_product("kb-001", "129.99").await;
        let response = invalidator.handle(env.new_stream_event().await).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "{mode:?}: {response:?}"
        );
        // Read until filled (the first reads may bypass while the connection forms).
        for attempt in 0.. {
            assert!(attempt < 100, "{mode:?}: never filled");
            if read.get("kb-001").await.0 == CacheStatus::Hit {
                break;
            }
        }
        assert_eq!(
            cached_price(&mut conn).await,
            Some(json!(129.99)),
            "{mode:?}"
        );

        // The MODIFY: the cached 129.99 is replaced by nothing, not by the new image.
        env.put_product("kb-001", "99.99").await;
        let event = env.new_stream_event().await;
        assert_eq!(event["Records"][0]["eventName"], "MODIFY", "{mode:?}");
        lines.lock().unwrap().clear();
        let response = invalidator.handle(event).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "{mode:?}: {response:?}"
        );
        assert_eq!(cached_price(&mut conn).await, None, "{mode:?}: not deleted");
        let emf = crate::metrics::emf_of(&lines);
        assert_eq!(emf.len(), 1, "{mode:?}: one line per batch");
        let blind = if mode == Refresh { 1.0 } else { 0.0 };
        assert_eq!(
            crate::metrics::total(&emf, "BatchesEvictionGuardBlind"),
            blind,
            "{mode:?}"
        );

        // The next read fills the new item from the table.
        let (status, result) = read.get("kb-001").await;
        assert_eq!(
            (status, result.is_ok()),
            (CacheStatus::Miss, true),
            "{mode:?}"
        );
        assert_eq!(
            cached_price(&mut conn).await,
            Some(json!(99.99)),
            "{mode:?}"
        );
    }
}
