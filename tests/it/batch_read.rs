//! Many products in one request (`GET /products?ids=...`) against real servers: a Redis
//! Cluster whose slots are spread over every node, behind proxies adding ElastiCache's round
//! trip, at the default timeouts; a node that stalls; and DynamoDB's `BatchGetItem` through
//! moto, with the keys it leaves unprocessed.

use std::time::Duration;

use local_stack::services::RedisCluster;
use product_cache::config::{CacheSettings, InvalidationMode::*, ReadSettings, RedisSettings};
use product_cache::id::{KeyType, ProductId};
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::read::{BatchIds, CacheStatus, ReadPath};
use product_cache::store::ProductStore;
use serde_json::json;

use crate::aws_proxy::{AwsProxy, Behaviour};
use crate::support::{
    cache_with, dynamo_store, http_get, key_type_n, moto_endpoint, Counting, TestEnv,
};

/// ElastiCache's cross-AZ round trip, as the other cluster tests emulate it.
const ROUND_TRIP: Duration = Duration::from_micros(500);

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

/// Round trips each node's proxy counted since the last reset.
fn per_node(cluster: &RedisCluster) -> Vec<u64> {
    cluster.proxies().iter().map(|p| p.round_trips()).collect()
}

#[tokio::test]
async fn on_a_cluster_hits_cost_one_round_trip_per_node_and_misses_two_and_one_table_read() {
    let env = TestEnv::new(Delete).await;
    let cluster = RedisCluster::start_with_delay(3, ROUND_TRIP).await.unwrap();
    let settings = CacheSettings::default();
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    let cache = cache_with(&redis, &settings).await;
    let read = ReadPath::new(
        Counting::new(cache.clone()),
        Counting::new(env.store(&settings)),
        settings.clone(),
    );
    // An id with a comma, one with a space and one with a `+`: each arrives encoded on its own.
    let mut ids: Vec<String> = (0..47).map(|i| format!("{}-{i}", env.table)).collect();
    ids.extend(["a,b", "a b", "a+b"].map(|s| format!("{}-{s}", env.table)));
    for (i, id) in ids.iter().enumerate() {
        env.put_product(id, &i.to_string()).await;
    }
    // Connected, the slot map known (a node's breaker per key) and the probe script loaded on
    // every node (the first miss on a node costs one round trip more, once), before anything
    // is counted.
    let warm: Vec<String> = (0..30).map(|i| format!("{}-warm-{i}", env.table)).collect();
    let started = std::time::Instant::now();
    while !http_get(&read, &batch_path(&warm))
        .await
        .1
        .ends_with("bypasses=0")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while cache
        .breaker_node(&format!("product:{}", ids[0]))
        .starts_with("cluster")
    {
        assert!(started.elapsed() < Duration::from_secs(10), "no slot map");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // All misses: two round trips per node before the answer, one BatchGetItem.
    let batch = BatchIds::parse(Some(&batch_path(&ids)["/products?".len()..]), KeyType::S).unwrap();
    assert_eq!(batch.len(), 50);
    cluster.reset_counters();
    let table_reads = read.store().count();
    let (answer, after) = read.answer_many(&batch).await;
    let before_answer = per_node(&cluster);
    assert_eq!(answer.count(CacheStatus::Miss), 50);
    assert_eq!(
        read.store().count() - table_reads,
        1,
        "not one BatchGetItem"
    );
    assert!(
        before_answer.iter().all(|&n| (1..=2).contains(&n)),
        "round trips per node before the answer: {before_answer:?}"
    );
    // The fills are the after-work's: nothing cached yet.
    for id in &ids[..5] {
        assert_eq!(
            cache.get(&format!("product:{id}")).await.unwrap(),
            None,
            "{id}"
        );
    }
    cluster.reset_counters();
    after.await;

    // All hits, in request order, each price its own: one round trip per node.
    cluster.reset_counters();
    let (code, x_cache, body) = http_get(&read, &batch_path(&ids)).await;
    let hits = per_node(&cluster);
    assert_eq!(
        (code, x_cache.as_str()),
        (200, "hits=50 misses=0 bypasses=0"),
        "{body}"
    );
    assert!(
        hits.iter().all(|&n| n == 1),
        "round trips per node for hits: {hits:?}"
    );
    assert_eq!(read.store().count() - table_reads, 1, "hits read the table");
    let products = body["products"].as_array().unwrap();
    assert_eq!(products.len(), 50);
    for (i, (entry, id)) in products.iter().zip(&ids).enumerate() {
        assert_eq!(entry["id"], json!(id));
        assert_eq!(entry["product"]["price"], json!(i), "{id}");
    }
    // The keys really were spread over every node: no single-node shortcut hid a CROSSSLOT.
    let mut holding = 0;
    for role in cluster.roles().await.unwrap().iter().filter(|r| r.primary) {
        let slots: Vec<u16> = ids
            .iter()
            .map(|id| product_cache::cache::slots::slot_of(&format!("product:{id}")))
            .collect();
        holding += usize::from(slots.iter().any(|&s| role.serves(s)));
    }
    assert_eq!(holding, 3, "the batch's keys are not on every node");
}

#[tokio::test]
async fn a_stalled_node_costs_its_own_products_a_bypass_and_the_others_nothing() {
    let env = TestEnv::new(Delete).await;
    // Nodes keep serving their own slots while another is down (the stall may outlast
    // `cluster-node-timeout` on a loaded machine), as in `breaker.rs`.
    let cluster = RedisCluster::start_with(3, &["--cluster-require-full-coverage", "no"])
        .await
        .unwrap();
    let settings = CacheSettings::default();
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let read = ReadPath::build(ReadSettings::new(redis, &env.table, settings), &env.sdk)
        .await
        .unwrap()
        .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    let ids: Vec<String> = (0..30).map(|i| format!("{}-{i}", env.table)).collect();
    for id in &ids {
        env.put_product(id, "10").await;
    }
    let path = batch_path(&ids);
    let started = std::time::Instant::now();
    loop {
        let (code, x_cache, _) = http_get(&read, &path).await;
        assert_eq!(code, 200);
        if x_cache == "hits=30 misses=0 bypasses=0"
            && !read
                .cache()
                .breaker_node("product:x")
                .starts_with("cluster")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never all hits: {x_cache}"
        );
    }
    let stalled_port = cluster
        .primary_of_slot(product_cache::cache::slots::slot_of(&format!(
            "product:{}",
            ids[0]
        )))
        .await
        .unwrap();
    let on_stalled = ids
        .iter()
        .filter(|id| {
            read.cache()
                .breaker_node(&format!("product:{id}"))
                .ends_with(&format!(":{stalled_port}"))
        })
        .count();
    assert!(on_stalled > 0 && on_stalled < ids.len(), "{on_stalled}");

    cluster.stall(stalled_port);
    let stalled = scopeguard(&cluster, stalled_port);
    // Every batch answers every product, the stalled node's from the table; once its breaker
    // opens, without asking it.
    let mut opened = false;
    for _ in 0..10 {
        lines.lock().unwrap().clear();
        let (code, x_cache, body) = http_get(&read, &path).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            x_cache,
            format!(
                "hits={} misses=0 bypasses={on_stalled}",
                ids.len() - on_stalled
            )
        );
        assert!(body["products"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["product"]["price"] == json!(10)));
        let line: serde_json::Value = serde_json::from_str(&lines.lock().unwrap()[0]).unwrap();
        if line["BreakerBypasses"] == json!(on_stalled) {
            opened = true;
            break;
        }
    }
    assert!(opened, "the stalled node's breaker never opened");
    drop(stalled);
    // Thawed: back to all hits within a breaker interval or two.
    let started = std::time::Instant::now();
    loop {
        let (_, x_cache, _) = http_get(&read, &path).await;
        if x_cache == "hits=30 misses=0 bypasses=0" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never recovered: {x_cache}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resumes the stalled node when dropped, also when the test fails.
fn scopeguard(cluster: &RedisCluster, port: u16) -> impl Drop + '_ {
    struct Resume<'a>(&'a RedisCluster, u16);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.resume(self.1);
        }
    }
    Resume(cluster, port)
}

#[tokio::test]
async fn batch_get_item_reads_consistently_and_retries_what_it_left_unprocessed() {
    let env = TestEnv::new(Delete).await;
    let ids: Vec<ProductId> = (0..100)
        .map(|i| ProductId::parse(&format!("{}-{i}", env.table), KeyType::S).unwrap())
        .collect();
    for id in &ids[..90] {
        env.put_product(id.as_str(), "7").await;
    }
    let settings = CacheSettings::default();

    // Left unprocessed twice, then read: every id answered, the last ten as absent.
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            unprocessed_keys: Some((30, 2)),
            ..Behaviour::default()
        },
    )
    .await;
    let sdk = local_stack::table::local_sdk_config(&proxy.endpoint()).await;
    let store = dynamo_store(&sdk, &env.table, &settings);
    let read = store.get_many(&ids).await;
    assert_eq!(read.len(), 100);
    for (i, item) in read.iter().enumerate() {
        let item = item.as_ref().unwrap_or_else(|e| panic!("{i}: {e}"));
        assert_eq!(item.is_some(), i < 90, "{i}");
    }
    let counts = proxy.counts();
    assert_eq!((counts.batch_gets, counts.unprocessed_keys), (3, 60));
    assert_eq!(
        counts.consistent_batch_gets, 3,
        "CONSISTENT_READ not honoured"
    );

    // Left unprocessed every time: those keys are errors, the rest answered, the retries bounded.
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            unprocessed_keys: Some((5, usize::MAX)),
            ..Behaviour::default()
        },
    )
    .await;
    let sdk = local_stack::table::local_sdk_config(&proxy.endpoint()).await;
    let store = dynamo_store(&sdk, &env.table, &settings);
    let read = store.get_many(&ids[80..]).await;
    let failed: Vec<usize> = (0..read.len()).filter(|&i| read[i].is_err()).collect();
    assert_eq!(failed.len(), 5, "{failed:?}");
    assert!(read[..10].iter().all(|r| matches!(r, Ok(Some(_)))));
    assert_eq!(
        proxy.counts().batch_gets,
        5,
        "the retries are not bounded as documented"
    );

    // Eventually consistent when configured so.
    let proxy = AwsProxy::start(moto_endpoint(), Behaviour::default()).await;
    let sdk = local_stack::table::local_sdk_config(&proxy.endpoint()).await;
    let read_settings = ReadSettings {
        consistent_read: false,
        ..ReadSettings::new(RedisSettings::new(""), &env.table, settings.clone())
    };
    let store = product_cache::store::DynamoStore::from_settings(&read_settings, &sdk);
    assert!(store
        .get_many(&ids[..3])
        .await
        .iter()
        .all(|r| matches!(r, Ok(Some(_)))));
    assert_eq!(proxy.counts().consistent_batch_gets, 0);
}

#[tokio::test]
async fn number_keys_are_matched_back_to_their_ids() {
    let env = TestEnv::with_settings(Delete, key_type_n()).await;
    for (id, price) in [("1", "10"), ("-2.5", "20"), ("300", "30")] {
        env.dynamodb
            .put_item()
            .table_name(&env.table)
            .item(
                "productId",
                aws_sdk_dynamodb::types::AttributeValue::N(id.into()),
            )
            .item(
                "price",
                aws_sdk_dynamodb::types::AttributeValue::N(price.into()),
            )
            .send()
            .await
            .unwrap();
    }
    let (code, x_cache, body) = http_get(&env.read, "/products?ids=300,4,-2.5,1").await;
    assert_eq!(
        (code, x_cache.as_str()),
        (200, "hits=0 misses=4 bypasses=0"),
        "{body}"
    );
    let prices: Vec<_> = body["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["product"]["price"].clone())
        .collect();
    assert_eq!(prices, [json!(30), json!(null), json!(20), json!(10)]);
    let (code, _, body) = http_get(&env.read, "/products?ids=1,01").await;
    assert_eq!((code, body["error"].as_str()), (400, Some("invalid_ids")));
}

/// Until every node lists a replica for every slot range in `CLUSTER SLOTS`: the client reads
/// its slot map once when it connects, and a replica missing from it then is never read from.
async fn until_replicas_listed(cluster: &RedisCluster) {
    let started = std::time::Instant::now();
    'nodes: loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replicas never listed"
        );
        for port in cluster.ports() {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut conn)
                .await
                .unwrap();
            if ranges.is_empty() || ranges.iter().any(|range| range.len() < 4) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'nodes;
            }
        }
        return;
    }
}

#[tokio::test]
async fn with_replica_reads_a_batch_s_hits_come_from_the_replicas() {
    let env = TestEnv::new(Delete).await;
    let cluster = RedisCluster::start_with_replicas(3, 1).await.unwrap();
    until_replicas_listed(&cluster).await;
    let settings = CacheSettings::default();
    let redis = RedisSettings {
        cluster: true,
        read_from_replicas: true,
        ..RedisSettings::new(cluster.url())
    };
    let read = ReadPath::build(ReadSettings::new(redis, &env.table, settings), &env.sdk)
        .await
        .unwrap();
    let ids: Vec<String> = (0..30).map(|i| format!("{}-{i}", env.table)).collect();
    for id in &ids {
        env.put_product(id, "10").await;
    }
    let path = batch_path(&ids);
    // Connected (the client forms its connection in the background) and the slot map known.
    let started = std::time::Instant::now();
    while http_get(&read, &batch_path(&[format!("{}-warm", env.table)]))
        .await
        .1
        != "hits=0 misses=1 bypasses=0"
        || read
            .cache()
            .breaker_node("product:x")
            .starts_with("cluster")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        http_get(&read, &path).await.1,
        "hits=0 misses=30 bypasses=0"
    );
    let roles = cluster.roles().await.unwrap();
    for role in roles.iter().filter(|r| !r.primary) {
        cluster.await_in_sync(role.port).await.unwrap();
    }
    // The first hits open the client's connections to the replicas: on a loaded machine that
    // may take longer than a read's timeout once.
    let started = std::time::Instant::now();
    while http_get(&read, &path).await.1 != "hits=30 misses=0 bypasses=0" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never all hits"
        );
    }
    let mut before = Vec::new();
    for role in &roles {
        before.push(crate::support::command_calls(role.port, "get").await);
    }
    assert_eq!(
        http_get(&read, &path).await.1,
        "hits=30 misses=0 bypasses=0"
    );
    let (mut on_primaries, mut on_replicas) = (0, 0);
    for (role, before) in roles.iter().zip(before) {
        let served = crate::support::command_calls(role.port, "get").await - before;
        if role.primary {
            on_primaries += served;
        } else {
            on_replicas += served;
        }
    }
    assert_eq!(on_primaries, 0, "a hit's GET went to a primary");
    assert!(
        on_replicas >= 30,
        "the hits' GETs did not reach the replicas"
    );
}

/// Two batches each holding the lease of a key the other waits for. Each fills its own leased
/// key as soon as the table answers (it is waiting anyway), so the other is served by that
/// fill: each key is read from the table once. Holding the leases until after the answer, as
/// a batch without waiters does, made both wait out `LEASE_WAIT_MS` and read the other's key
/// again without filling it (found by the checker with every reader a batch reader).
#[tokio::test]
async fn two_batches_waiting_for_each_others_leases_serve_each_other() {
    let env = TestEnv::new(Delete).await;
    let (k1, k2) = (format!("{}-k1", env.table), format!("{}-k2", env.table));
    env.put_product(&k1, "1").await;
    env.put_product(&k2, "2").await;
    let settings = CacheSettings::default();
    let read = ReadPath::new(
        env.cache(&settings).await,
        Counting::new(env.store(&settings)),
        settings.clone(),
    );
    // Connected before anything is counted.
    let started = std::time::Instant::now();
    while read.cache().get("product:none").await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lease_of = |id: &str| format!("{{product:{id}}}:lease");
    // Another reader holds k1's lease, long enough.
    let far = 4_102_444_800_000_u64; // 2100-01-01, in ms
    env.raw_set(&lease_of(&k1), &format!("{far}:someone")).await;

    let b = BatchIds::parse(Some(&format!("ids={k2},{k1}")), KeyType::S).unwrap();
    let a = BatchIds::parse(Some(&format!("ids={k1},{k2}")), KeyType::S).unwrap();
    let batch_b = async {
        let (answer, after) = read.answer_many(&b).await;
        after.await;
        answer
    };
    let batch_a = async {
        // B holds k2's lease and waits for k1's: now k1's holder goes away without filling,
        // and A takes k1's lease and waits for k2's. A must probe k1 before B's next probe
        // does, which nothing can be awaited for: by 120 ms of waiting B probes every 50 ms
        // (its backoff), so A, a round trip away, is almost always first. (When B is first,
        // B takes k1 and nobody waits for anybody: the test then passes without the fix too.)
        let started = std::time::Instant::now();
        while env.raw_get(&lease_of(&k2)).await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "B never leased k2"
            );
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        env.raw_del(&lease_of(&k1)).await;
        let (answer, after) = read.answer_many(&a).await;
        after.await;
        answer
    };
    let (answer_b, answer_a) = tokio::join!(batch_b, batch_a);
    for answer in [&answer_a, &answer_b] {
        assert!(
            answer.entries.iter().all(|e| e.result.is_ok()),
            "{answer:?}"
        );
    }
    assert_eq!(
        read.store().count(),
        2,
        "a key was read from the table twice: A {:?}, B {:?}",
        answer_a
            .entries
            .iter()
            .map(|e| e.status)
            .collect::<Vec<_>>(),
        answer_b
            .entries
            .iter()
            .map(|e| e.status)
            .collect::<Vec<_>>()
    );
    assert!(env.raw_get(&format!("product:{k1}")).await.is_some());
    assert!(env.raw_get(&format!("product:{k2}")).await.is_some());
}

/// Past Lambda's 6 MB, counted as Lambda escapes the body: a 413 that says so, never a cut
/// body; the same products in two requests are answered.
#[tokio::test]
async fn an_answer_past_lambdas_response_limit_is_a_413_with_real_servers() {
    let env = TestEnv::new(Delete).await;
    // 60 documents of ~100 KB of quotes: 6 MB as stored, about 12 MB as Lambda escapes them.
    let doc = format!(r#"{{"tags":[{}]}}"#, vec![r#""""#; 33_000].join(","));
    let ids: Vec<String> = (0..60).map(|i| format!("{}-big{i}", env.table)).collect();
    for id in &ids {
        env.raw_set(&format!("product:{id}"), &doc).await;
    }
    let (code, x_cache, body) = http_get(&env.read, &batch_path(&ids)).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (413, Some("response_too_large")),
        "{x_cache}"
    );
    assert_eq!(x_cache, "hits=60 misses=0 bypasses=0");
    assert!(body["message"].as_str().unwrap().contains("fewer ids"));
    for half in ids.chunks(30) {
        let (code, x_cache, body) = http_get(&env.read, &batch_path(half)).await;
        assert_eq!(
            (code, x_cache.as_str()),
            (200, "hits=30 misses=0 bypasses=0")
        );
        assert_eq!(body["products"].as_array().unwrap().len(), 30);
    }
    assert_eq!(env.read.store().count(), 0, "hits read the table");
}
