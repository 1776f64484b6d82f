//! The cache inspector against real servers: it finds a deliberately corrupted key (and only
//! that one) on a single node and across every primary of a cluster, says so in its metrics,
//! repairs it when told to, and does not count a change that settles within its grace period.
//! (That it stays silent under load is the checker's: every run asserts it.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use local_stack::services::RedisCluster;
use product_cache::config::InvalidationMode::{Delete, Refresh};
use product_cache::config::{CacheSettings, ReadSettings, RedisSettings};
use product_cache::inspect::{InspectSettings, Inspector, Target, Verdict};
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::read::ReadPath;
use serde_json::json;

use crate::support::{http_get, Counting, TestEnv};

const GRACE: Duration = Duration::from_millis(300);

fn settings(repair: bool) -> InspectSettings {
    InspectSettings {
        sample: 1000,
        grace: GRACE,
        repair,
        ..InspectSettings::default()
    }
}

/// Products `<prefix>-0..n` in the table, each read once through `read` (a miss that fills).
async fn cached_products<C, S>(env: &TestEnv, read: &ReadPath<C, S>, prefix: &str, n: usize)
where
    C: product_cache::cache::Cache,
    S: product_cache::store::ProductStore,
{
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        env.put_product(&id, "10").await;
        let (status, x_cache, _) = http_get(read, &format!("/products/{id}")).await;
        assert_eq!((status, x_cache.as_str()), (200, "miss"), "{id}");
    }
}

/// A cached document with another price than the table's: what a lost invalidation leaves.
fn corrupted(id: &str) -> String {
    json!({"name": format!("Product {id}"), "price": 1, "productId": id}).to_string()
}

/// A connection to one node of a cluster, as it is (no redirections followed).
async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// The product keys one node holds.
async fn product_keys_on(port: u16) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("product:*")
        .query_async(&mut node(port).await)
        .await
        .unwrap()
}

fn inconsistent(report: &product_cache::inspect::Report) -> Vec<String> {
    report
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Inconsistent)
        .map(|r| r.key.clone())
        .collect()
}

#[tokio::test]
async fn finds_a_corrupted_key_says_so_in_its_metrics_and_repairs_it() {
    let env = TestEnv::new(Delete).await;
    cached_products(&env, &env.read, "ins", 20).await;
    env.raw_set("product:ins-7", &corrupted("ins-7")).await;
    // Not a product id (another writer's key under the prefix): left out of the sample.
    env.raw_set("product:{not-ours}", "x").await;

    let lines = Arc::new(Mutex::new(Vec::new()));
    let env = &env;
    let inspector = |repair| async move {
        Inspector::new(
            env.cache(&env.settings).await,
            env.store(&env.settings),
            env.settings.clone(),
            settings(repair),
        )
    };
    let looking = inspector(false)
        .await
        .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    let report = looking.run(Target::Sample(1000)).await.unwrap();
    assert_eq!(report.checked(), 20, "every cached key sampled");
    assert_eq!(inconsistent(&report), ["product:ins-7"]);
    let row = report
        .rows
        .iter()
        .find(|r| r.key == "product:ins-7")
        .unwrap();
    assert_eq!(row.cached.as_deref(), Some(corrupted("ins-7").as_str()));
    assert_ne!(row.table, row.cached);
    assert_eq!(report.repaired, 0);
    assert!(
        env.raw_get("product:ins-7").await.is_some(),
        "left alone without repair"
    );

    // The metrics line, as CloudWatch reads it (an alarm on InconsistentKeys > 0 fires).
    let emf = crate::metrics::emf_of(&lines);
    assert_eq!(emf.len(), 1);
    assert_eq!(crate::metrics::total(&emf, "KeysChecked"), 20.0);
    assert_eq!(crate::metrics::total(&emf, "InconsistentKeys"), 1.0);
    assert!(crate::metrics::alarm_fires(
        "InconsistentKeysAlarm",
        &emf,
        "product-cache"
    ));

    // Given ids instead of a sample: the cached ones compared, the others "not cached".
    let ids = vec!["ins-7".to_owned(), "ins-8".to_owned(), "never".to_owned()];
    let report = looking.run(Target::Ids(ids)).await.unwrap();
    let verdicts: Vec<_> = report.rows.iter().map(|r| r.verdict).collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Inconsistent,
            Verdict::Consistent,
            Verdict::NotCached
        ]
    );

    // Repair purges the key (and its lease); the next read fills it from the table again.
    let repairing = inspector(true).await;
    let report = repairing.run(Target::Sample(1000)).await.unwrap();
    assert_eq!((inconsistent(&report).len(), report.repaired), (1, 1));
    assert_eq!(env.raw_get("product:ins-7").await, None);
    let (_, x_cache, body) = env.http_get("ins-7").await;
    assert_eq!((x_cache.as_str(), &body["price"]), ("miss", &json!(10)));
    lines.lock().unwrap().clear();
    let report = looking.run(Target::Sample(1000)).await.unwrap();
    assert_eq!((report.checked(), inconsistent(&report).len()), (20, 0));
    let emf = crate::metrics::emf_of(&lines);
    assert_eq!(
        crate::metrics::total(&emf, "KeysChecked"),
        20.0,
        "a 0 is a data point"
    );
    assert!(!crate::metrics::alarm_fires(
        "InconsistentKeysAlarm",
        &emf,
        "product-cache"
    ));
}

/// A suspect that changes during the grace period is an invalidation in flight: not counted.
#[tokio::test]
async fn a_change_within_the_grace_period_is_not_an_inconsistency() {
    let env = TestEnv::new(Delete).await;
    cached_products(&env, &env.read, "grace", 3).await;
    env.raw_set("product:grace-1", &corrupted("grace-1")).await;
    let store = Counting::new(env.store(&env.settings));
    let table_reads = store.calls.clone();
    let inspector = Inspector::new(
        env.cache(&env.settings).await,
        store,
        env.settings.clone(),
        InspectSettings {
            grace: Duration::from_secs(2),
            ..settings(false)
        },
    );
    let run = tokio::spawn(async move { inspector.run(Target::Sample(100)).await });
    // Once the first look has read the table, the "invalidation" lands.
    let started = std::time::Instant::now();
    while table_reads.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(started.elapsed() < Duration::from_secs(10), "no first look");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.raw_del("product:grace-1").await;
    let report = run.await.unwrap().unwrap();
    let row = report
        .rows
        .iter()
        .find(|r| r.key == "product:grace-1")
        .unwrap();
    assert_eq!(row.verdict, Verdict::Settled, "{report:?}");
    assert_eq!(inconsistent(&report), Vec::<String>::new());
}

#[tokio::test]
async fn samples_every_primary_of_a_cluster() {
    let cluster = RedisCluster::start(3).await.unwrap();
    let env = TestEnv::new(Delete).await;
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    let read = ReadSettings::new(redis.clone(), &env.table, CacheSettings::default());
    let read = ReadPath::build(read.clone(), &env.sdk).await.unwrap();
    cached_products(&env, &read, "clu", 30).await;
    // Keys on every primary (30 keys over 3 primaries: a missing shard would be noticed).
    let mut per_node = Vec::new();
    for port in cluster.ports() {
        per_node.push(product_keys_on(port).await);
    }
    assert!(per_node.iter().all(|k| !k.is_empty()), "{per_node:?}");
    let corrupt_key = per_node[2][0].clone();
    let id = corrupt_key.trim_start_matches("product:").to_owned();
    let mut conn = node(cluster.ports()[2]).await;
    redis::cmd("SET")
        .arg(&corrupt_key)
        .arg(corrupted(&id))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let read_settings = ReadSettings::new(redis, &env.table, CacheSettings::default());
    let inspector = Inspector::build(read_settings, settings(false), &env.sdk)
        .await
        .unwrap();
    let report = inspector.run(Target::Sample(1000)).await.unwrap();
    assert_eq!(report.checked(), 30, "keys from every primary");
    assert_eq!(inconsistent(&report), [corrupt_key]);
}

/// The inspector works as a user with exactly its documented rules, and the functions' user,
/// which has no `RANDOMKEY`, cannot draw its sample.
#[tokio::test]
async fn runs_under_its_documented_least_privilege_user() {
    let env = TestEnv::new(Delete).await;
    let mut args: Vec<String> = Vec::new();
    for (user, rules) in [
        ("functions", product_cache::acl::rules("product:")),
        ("inspector", product_cache::acl::inspector_rules("product:")),
    ] {
        args.extend(["--user", user, "on", ">pw"].map(str::to_owned));
        args.extend(rules.split(' ').map(str::to_owned));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let restricted = local_stack::services::RedisServer::start_with(&args)
        .await
        .unwrap();
    let url = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", restricted.port());
    let read = ReadSettings::new(
        RedisSettings::new(url("functions")),
        &env.table,
        env.settings.clone(),
    );
    let read_path = ReadPath::build(read, &env.sdk).await.unwrap();
    cached_products(&env, &read_path, "acl", 5).await;

    let inspector = |user: &str| {
        let read = ReadSettings::new(
            RedisSettings::new(url(user)),
            &env.table,
            env.settings.clone(),
        );
        Inspector::build(read, settings(true), &env.sdk)
    };
    let refused = inspector("functions")
        .await
        .unwrap()
        .run(Target::Sample(10))
        .await;
    let refused = format!(
        "{:?}",
        refused.expect_err("RANDOMKEY is not the functions'")
    );
    assert!(refused.to_lowercase().contains("permission"), "{refused}");

    let inspecting = inspector("inspector").await.unwrap();
    let report = inspecting.run(Target::Sample(10)).await.unwrap();
    assert_eq!(report.checked(), 5);
    // Repair (DEL of the key and its lease) is within its rules too.
    let mut conn = redis::Client::open(url("inspector"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SET")
        .arg("product:acl-1")
        .arg(corrupted("acl-1"))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let report = inspecting.run(Target::Sample(10)).await.unwrap();
    assert_eq!((inconsistent(&report).len(), report.repaired), (1, 1));
}

/// A small catalogue among the epoch keys: a Redis declared empty for refresh mode holds one
/// epoch key per hash slot (16,384), so four cached products are about one key in 4,100 and a
/// round of `RANDOMKEY` draws usually finds none of them. The sampler draws on until its sample
/// is full or its draws are spent (50,000, about 12 per key: `RANDOMKEY` is uneven enough that
/// a product is missed about 6 % of the time, all four about once in 50,000); had it stopped
/// after a round that found no product key, it would come back empty, an all-clear that
/// checked nothing. A sample of 4 (a first round of 12 draws) shows that nearly every time;
/// the default sample too, most of the time.
#[tokio::test]
async fn the_sampler_finds_a_small_catalogue_among_the_epoch_keys() {
    let env = TestEnv::new(Refresh).await;
    cached_products(&env, &env.read, "few", 4).await;
    let mut conn = env.redis_conn().await;
    let keys: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert!(keys > 16_384, "the epoch keys and the products: {keys}");

    let inspector = Inspector::new(
        env.cache(&env.settings).await,
        env.store(&env.settings),
        env.settings.clone(),
        settings(false),
    );
    for wanted in [4, InspectSettings::default().sample] {
        let report = inspector.run(Target::Sample(wanted)).await.unwrap();
        println!(
            "a sample of {wanted} among {keys} keys checked {} of 4 products",
            report.checked()
        );
        assert!(report.checked() >= 1, "sample of {wanted}: {report:?}");
        assert!(report.checked() <= 4, "{report:?}");
        assert_eq!(inconsistent(&report), Vec::<String>::new());
    }
}

/// A scheduled inspection that last ran before a primary was lost finds the lost node in its
/// map at its next run: the breaker open (or, its trial due, the connection refused), and the
/// map it was routed by naming the dead node. It fetches the map again and goes once more, so
/// its first run after the cluster promoted the replica reads the replica and finds the
/// corrupted key there. (Each operation was tried once, failed, and the run with it: the
/// change monitor's batch after a failover went unchecked the same way, and once left the
/// consistency checker's final look without a verdict.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_first_run_after_a_primary_was_lost_reads_the_promoted_replica() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1).await.unwrap();
    let env = TestEnv::new(Delete).await;
    let redis = RedisSettings {
        cluster: true,
        ..RedisSettings::new(cluster.url())
    };
    let read = ReadSettings::new(redis.clone(), &env.table, CacheSettings::default());
    let read = ReadPath::build(read, &env.sdk).await.unwrap();
    cached_products(&env, &read, "lost", 30).await;
    let inspector = Inspector::build(
        ReadSettings::new(redis, &env.table, CacheSettings::default()),
        settings(false),
        &env.sdk,
    )
    .await
    .unwrap();
    assert_eq!(
        inspector.run(Target::Sample(1000)).await.unwrap().checked(),
        30
    );

    // A primary other than the entry node, killed outright; runs meanwhile fail on it (its
    // breaker opens), and the cluster promotes its replica.
    let entry = cluster.ports()[0];
    let lost = cluster.primary_except(&[entry]).await.unwrap();
    let replica = cluster.kill_now(lost).await.unwrap();
    let mut failed = 0;
    for _ in 0..3 {
        failed += usize::from(inspector.run(Target::Sample(1000)).await.is_err());
    }
    assert!(failed > 0, "no run met the lost primary");
    cluster.await_role(replica, true).await.unwrap();
    // Every node that is left names the replica as its shard's primary: the map asked again
    // now is the new one, whichever node answers.
    for attempt in 0.. {
        assert!(attempt < 100, "the promotion never reached every node");
        let mut everywhere = true;
        for port in cluster.ports().into_iter().filter(|&p| p != lost) {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut node(port).await)
                .await
                .unwrap();
            everywhere &= nodes
                .lines()
                .any(|l| l.contains(&format!(":{replica}@")) && l.contains("master"));
        }
        if everywhere {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = product_keys_on(replica).await;
    let mut conn = node(replica).await;
    let corrupt_key = keys.first().expect("the lost shard's keys").clone();
    let id = corrupt_key.trim_start_matches("product:").to_owned();
    redis::cmd("SET")
        .arg(&corrupt_key)
        .arg(corrupted(&id))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let report = inspector
        .run(Target::Sample(1000))
        .await
        .expect("the first run after the promotion");
    assert_eq!(report.checked(), 30, "keys from every shard");
    assert_eq!(inconsistent(&report), [corrupt_key]);
}
