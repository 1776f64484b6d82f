//! The change monitor against a real Redis and a real table's stream: the records it judges are
//! the ones the invalidator was (or was not) given, read from moto's stream. It finds a stale
//! entry planted after a change was applied (and repairs it), tells a lagging invalidator's
//! pending changes from inconsistencies, infers the invalidator's progress through a shard from
//! the other keys of a batch, judges a key changed again on its newest change, and keeps the
//! same share of keys in every batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use product_cache::config::InvalidationMode::{Delete, Refresh};
use product_cache::inspect::{InspectSettings, Inspector};
use product_cache::metrics::{MetricsSettings, Sink};
use product_cache::monitor::{ChangeReport, ChangeVerdict};
use serde_json::{json, Value};

use crate::support::{command_calls, TestEnv};

/// Short: the records are judged a moment after they are made, as the mapping's window and the
/// grace would in production.
const GRACE: Duration = Duration::from_millis(200);

async fn monitor(
    env: &TestEnv,
    repair: bool,
    share: f64,
) -> Inspector<product_cache::store::DynamoStore> {
    monitor_with(
        env,
        InspectSettings {
            grace: GRACE,
            repair,
            change_share: share,
            ..InspectSettings::default()
        },
    )
    .await
}

async fn monitor_with(
    env: &TestEnv,
    settings: InspectSettings,
) -> Inspector<product_cache::store::DynamoStore> {
    Inspector::new(
        env.cache(&env.settings).await,
        env.store(&env.settings),
        env.settings.clone(),
        settings,
    )
}

fn records(event: &Value) -> Vec<Value> {
    event["Records"].as_array().unwrap().clone()
}

fn verdict_of(report: &ChangeReport, key: &str) -> ChangeVerdict {
    report
        .rows
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("{key} not judged: {report:?}"))
        .verdict
}

fn inconsistent(report: &ChangeReport) -> Vec<&str> {
    report.inconsistent().collect()
}

/// The document the read path cached for a product at `price`, as `TestEnv::put_product`
/// writes it.
fn document(id: &str, price: &str) -> String {
    json!({"name": format!("Product {id}"), "price": price.parse::<f64>().unwrap(), "productId": id})
        .to_string()
}

#[tokio::test]
async fn a_stale_entry_planted_after_its_change_is_found_alarmed_and_repaired() {
    let mut env = TestEnv::new(Refresh).await;
    for i in 0..10 {
        env.put_product(&format!("m-{i}"), "10").await;
    }
    let event = env.new_stream_event().await;
    let response = env.invalidator.handle(event.clone()).await;
    assert!(response.batch_item_failures.is_empty());
    // A race the invalidator lost: an old document written over m-3's refresh after it.
    env.raw_set("product:m-3", &document("m-3", "7")).await;

    let lines = Arc::new(Mutex::new(Vec::new()));
    let looking = monitor(&env, false, 1.0)
        .await
        .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
    // As the function receives it, with a record whose shape is wrong at its end: it costs
    // itself, never the batch.
    let mut with_malformed = records(&event);
    with_malformed.push(json!({"eventName": "MODIFY", "dynamodb": {"SequenceNumber": "9"}}));
    let summary = looking
        .handle(json!({"Records": with_malformed}))
        .await
        .unwrap();
    assert_eq!(summary["changes"], json!(10), "{summary}");
    assert_eq!(summary["inconsistent"], json!(["product:m-3"]), "{summary}");
    assert_eq!(summary["pending"], json!(0), "{summary}");

    let emf = crate::metrics::emf_of(&lines);
    assert_eq!(crate::metrics::total(&emf, "ChangesChecked"), 10.0);
    assert_eq!(crate::metrics::total(&emf, "ChangesInconsistent"), 1.0);
    assert!(crate::metrics::alarm_fires(
        "ChangesInconsistentAlarm",
        &emf,
        "product-cache"
    ));
    assert!(
        env.raw_get("product:m-3").await.is_some(),
        "left alone without repair"
    );

    // Repair purges it; the next read fills the table's version.
    let report = monitor(&env, true, 1.0)
        .await
        .check_changes(&records(&event))
        .await;
    assert_eq!(
        (inconsistent(&report), report.repaired),
        (vec!["product:m-3"], 1)
    );
    assert_eq!(env.raw_get("product:m-3").await, None);
    let (_, x_cache, body) = env.http_get("m-3").await;
    assert_eq!((x_cache.as_str(), &body["price"]), ("miss", &json!(10)));

    // The same batch again, nothing planted: nothing found, and a 0 is a data point.
    lines.lock().unwrap().clear();
    let report = looking.check_changes(&records(&event)).await;
    assert_eq!((report.rows.len(), inconsistent(&report).len()), (10, 0));
    let emf = crate::metrics::emf_of(&lines);
    assert_eq!(crate::metrics::total(&emf, "ChangesChecked"), 10.0);
    assert!(!crate::metrics::alarm_fires(
        "ChangesInconsistentAlarm",
        &emf,
        "product-cache"
    ));
}

/// Changes the invalidator has not applied (its stream lags): the cache still holds the
/// versions before them. Pending, with their age, never inconsistent: a lag is not an alarm.
/// Once the invalidator catches up, the same changes are consistent.
#[tokio::test]
async fn a_lagging_invalidator_shows_as_pending_not_as_inconsistency() {
    for mode in [Delete, Refresh] {
        let mut env = TestEnv::new(mode).await;
        for i in 0..6 {
            env.put_product(&format!("lag-{i}"), "10").await;
        }
        env.drain_stream().await;
        // Cached: by the refreshes, or (deleting) by these reads' fills.
        for i in 0..6 {
            let (status, _, _) = env.http_get(&format!("lag-{i}")).await;
            assert_eq!(status, 200);
            assert!(env.raw_get(&format!("product:lag-{i}")).await.is_some());
        }
        for i in 0..6 {
            env.put_product(&format!("lag-{i}"), "12").await;
        }
        let event = env.new_stream_event().await;

        let lines = Arc::new(Mutex::new(Vec::new()));
        let looking = monitor(&env, false, 1.0)
            .await
            .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
        let report = looking.check_changes(&records(&event)).await;
        assert_eq!(report.rows.len(), 6, "{mode:?}: {report:?}");
        for row in &report.rows {
            let ChangeVerdict::Pending(age) = row.verdict else {
                panic!("{mode:?}: {row:?} is not pending");
            };
            assert!(
                age >= GRACE,
                "{mode:?}: judged a grace after it was made: {age:?}"
            );
        }
        let emf = crate::metrics::emf_of(&lines);
        assert_eq!(crate::metrics::total(&emf, "ChangesPending"), 6.0);
        assert_eq!(crate::metrics::total(&emf, "ChangesInconsistent"), 0.0);
        assert!(!crate::metrics::alarm_fires(
            "ChangesInconsistentAlarm",
            &emf,
            "product-cache"
        ));

        // The invalidator catches up: the same changes are now consistent.
        let response = env.invalidator.handle(event.clone()).await;
        assert!(response.batch_item_failures.is_empty());
        let report = looking.check_changes(&records(&event)).await;
        assert_eq!(
            report.count(|v| *v == ChangeVerdict::Consistent),
            6,
            "{mode:?}: {report:?}"
        );
    }
}

/// `lost` changed, then three other products, all applied by the invalidator; then `lost`'s
/// document and position as before its change, as a failover to a replica that never got the
/// change leaves them. Answers the changes' event.
async fn lost_invalidation(env: &mut TestEnv) -> Value {
    env.put_product("lost", "10").await;
    env.drain_stream().await;
    let before = env.raw_get("product:lost").await.expect("refreshed");
    let position_key = product_cache::cache::version_key("product:lost");
    let position = env
        .raw_get(&position_key)
        .await
        .expect("the refresh recorded its position");
    env.put_product("lost", "11").await;
    for i in 0..3 {
        env.put_product(&format!("later-{i}"), "10").await;
    }
    let event = env.drain_stream_returning().await;
    env.raw_set("product:lost", &before).await;
    env.raw_set(&position_key, &position).await;
    event
}

/// A lost invalidation (the node that applied it failed over to a replica that never got it)
/// leaves the key's old position and old document, as a lagging invalidator would. The other
/// keys of the batch, later in the same shard, hold their positions: the invalidator is past
/// the lost change, so it is inconsistent. Judged alone, without those keys to show the
/// invalidator's progress, it can only be pending: that is what the inference adds.
#[tokio::test]
async fn a_lost_invalidation_behind_the_invalidators_progress_is_inconsistent() {
    let mut env = TestEnv::new(Refresh).await;
    let event = lost_invalidation(&mut env).await;

    let looking = monitor(&env, false, 1.0).await;
    let report = looking.check_changes(&records(&event)).await;
    assert_eq!(
        verdict_of(&report, "product:lost"),
        ChangeVerdict::Inconsistent,
        "{report:?}"
    );
    assert_eq!(inconsistent(&report), ["product:lost"]);

    let alone: Vec<Value> = records(&event)
        .into_iter()
        .filter(|r| r["dynamodb"]["Keys"]["productId"]["S"] == "lost")
        .collect();
    let report = looking.check_changes(&alone).await;
    assert!(
        matches!(
            verdict_of(&report, "product:lost"),
            ChangeVerdict::Pending(_)
        ),
        "{report:?}"
    );
}

/// The same lost change with the invalidator running several batches of a shard at once
/// (`INVALIDATOR_PARALLELIZATION_FACTOR` above 1): later keys' positions say nothing of it, so
/// it is pending. And a change whose node failed in the invalidator's batch while later
/// records applied elsewhere, retried by the mapping within a grace period: looked at again,
/// it is not an inconsistency.
#[tokio::test]
async fn progress_is_not_inferred_across_parallel_batches_and_a_retried_failure_settles() {
    let mut env = TestEnv::new(Refresh).await;
    let event = lost_invalidation(&mut env).await;

    let parallel = monitor_with(
        &env,
        InspectSettings {
            grace: GRACE,
            shard_order: false,
            ..InspectSettings::default()
        },
    )
    .await;
    let report = parallel.check_changes(&records(&event)).await;
    assert!(
        matches!(
            verdict_of(&report, "product:lost"),
            ChangeVerdict::Pending(_)
        ),
        "{report:?}"
    );

    // The retry lands while the monitor looks: once its first look has read the cache (two
    // GETs a key: document and position), the invalidator applies the batch again.
    let looking = monitor_with(
        &env,
        InspectSettings {
            grace: Duration::from_secs(2),
            ..InspectSettings::default()
        },
    )
    .await;
    let gets_before = command_calls(env.redis.port(), "get").await;
    let all = records(&event);
    let judging = tokio::spawn(async move { looking.check_changes(&all).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while command_calls(env.redis.port(), "get").await < gets_before + 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the monitor never read the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = env.invalidator.handle(event.clone()).await;
    assert!(response.batch_item_failures.is_empty());
    let report = judging.await.unwrap();
    assert_eq!(
        verdict_of(&report, "product:lost"),
        ChangeVerdict::Consistent,
        "{report:?}"
    );
}

/// A key changed twice in a batch is judged once, on its newest change. A batch judged after
/// the key changed again (and that change was applied) is superseded, not inconsistent: the
/// later change's own batch decides.
#[tokio::test]
async fn a_key_changed_again_is_judged_on_its_newest_change() {
    let mut env = TestEnv::new(Refresh).await;
    env.put_product("twice", "10").await;
    env.put_product("twice", "11").await;
    let first = env.new_stream_event().await;
    assert_eq!(records(&first).len(), 2);
    env.invalidator.handle(first.clone()).await;
    let looking = monitor(&env, false, 1.0).await;
    let report = looking.check_changes(&records(&first)).await;
    assert_eq!(report.rows.len(), 1, "{report:?}");
    assert_eq!(
        verdict_of(&report, "product:twice"),
        ChangeVerdict::Consistent
    );

    env.put_product("twice", "12").await;
    env.drain_stream().await;
    let report = looking.check_changes(&records(&first)).await;
    assert_eq!(
        verdict_of(&report, "product:twice"),
        ChangeVerdict::Superseded,
        "{report:?}"
    );
}

/// `MONITOR_SHARE` keeps the same keys in every batch, so a key's every change is judged or
/// none is.
#[tokio::test]
async fn a_share_of_the_keys_is_the_same_keys_in_every_batch() {
    let mut env = TestEnv::new(Refresh).await;
    for i in 0..40 {
        env.put_product(&format!("share-{i}"), "10").await;
    }
    let first = env.drain_stream_returning().await;
    for i in 0..40 {
        env.put_product(&format!("share-{i}"), "11").await;
    }
    let second = env.drain_stream_returning().await;
    let looking = monitor(&env, false, 0.5).await;
    let judged = |report: &ChangeReport| {
        let mut keys: Vec<String> = report.rows.iter().map(|r| r.key.clone()).collect();
        keys.sort();
        keys
    };
    let a = looking.check_changes(&records(&first)).await;
    let b = looking.check_changes(&records(&second)).await;
    assert_eq!(a.rows.len() + a.skipped, 40);
    assert!(
        (8..=32).contains(&a.rows.len()),
        "about half of 40 keys: {}",
        a.rows.len()
    );
    assert_eq!(judged(&a), judged(&b));
}

/// Redis stalled (SIGSTOP) while a batch is judged: the batch costs its bounded calls and comes
/// back unchecked, with the reason, never failing the stream; once Redis resumes, the next
/// batch is judged, stale entry and all.
#[tokio::test]
async fn a_stalled_redis_leaves_a_batch_unchecked_and_the_next_one_is_judged() {
    let mut env = TestEnv::new(Refresh).await;
    for i in 0..4 {
        env.put_product(&format!("st-{i}"), "10").await;
    }
    let event = env.drain_stream_returning().await;
    env.raw_set("product:st-1", &document("st-1", "7")).await;
    let looking = monitor(&env, false, 1.0).await;

    env.redis.stall();
    let summary = looking.handle(event.clone()).await;
    env.redis.resume();
    let summary = summary.expect("a stream batch never fails");
    assert_eq!(
        (&summary["changes"], &summary["unchecked"]),
        (&json!(0), &json!(4)),
        "{summary}"
    );
    let report = looking.check_changes(&records(&event)).await;
    assert_eq!(inconsistent(&report), ["product:st-1"], "{report:?}");
    assert_eq!(report.unchecked, 0);
}

/// A change C1 the invalidator applied (delete mode: the key's position is C1's), the item as
/// C1 left it filled back by a reader, and a second change C2 in the table that the
/// invalidator has not reached: the cache differs from the table only because C2 is pending.
/// With the stream's new images, the cached value is what C1 made: consistent. A `KEYS_ONLY`
/// stream carries no new image, so the cached value cannot be told from a stale one: C1 goes
/// unchecked, never inconsistent (else every lagging key of such a stream would page).
#[tokio::test]
async fn a_change_without_a_new_image_is_not_inconsistent_while_a_later_one_is_pending() {
    use aws_sdk_dynamodb::types::StreamViewType;
    use product_cache::config::CacheSettings;

    for view in [StreamViewType::KeysOnly, StreamViewType::NewAndOldImages] {
        let mut env =
            TestEnv::with_stream_view(Delete, CacheSettings::default(), view.clone()).await;
        // C1, applied.
        env.put_product("c1", "10.5").await;
        let c1 = env.drain_stream_returning().await;
        let record = &records(&c1)[0];
        assert_eq!(
            record["dynamodb"].get("NewImage").is_some(),
            view == StreamViewType::NewAndOldImages,
            "{view:?}: {record}"
        );
        let position_key = product_cache::cache::version_key("product:c1");
        assert!(
            env.raw_get(&position_key).await.is_some(),
            "{view:?}: the invalidator recorded C1's position"
        );
        // A reader fills the item as C1 left it.
        let (status, x_cache, body) = env.http_get("c1").await;
        assert_eq!(
            (status, x_cache.as_str(), &body["price"]),
            (200, "miss", &json!(10.5)),
            "{view:?}"
        );
        assert_eq!(
            env.raw_get("product:c1").await,
            Some(document("c1", "10.5")),
            "{view:?}"
        );
        // C2, in the table and the stream, not applied.
        env.put_product("c1", "12.5").await;

        let lines = Arc::new(Mutex::new(Vec::new()));
        let looking = monitor(&env, false, 1.0)
            .await
            .with_metrics(MetricsSettings::default(), Sink::Memory(lines.clone()));
        let report = looking.check_changes(&records(&c1)).await;
        let emf = crate::metrics::emf_of(&lines);
        assert_eq!(
            crate::metrics::total(&emf, "ChangesInconsistent"),
            0.0,
            "{view:?}: {report:?}"
        );
        assert!(!crate::metrics::alarm_fires(
            "ChangesInconsistentAlarm",
            &emf,
            "product-cache"
        ));
        if view == StreamViewType::KeysOnly {
            assert_eq!(
                (report.rows.len(), report.unchecked),
                (0, 1),
                "{view:?}: {report:?}"
            );
            assert_eq!(crate::metrics::total(&emf, "ChangesUnchecked"), 1.0);
        } else {
            assert_eq!(
                verdict_of(&report, "product:c1"),
                ChangeVerdict::Consistent,
                "{view:?}: {report:?}"
            );
            assert_eq!(report.unchecked, 0, "{report:?}");
        }
    }
}
