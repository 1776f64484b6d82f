//! Every fixture replayed through the invalidator against a real Redis.

use std::time::Duration;

use product_cache::config::CacheSettings;
use product_cache::config::InvalidationMode::{self, Delete, Refresh};
use product_cache::document::Document;
use serde_json::{json, Value};

use crate::support::{fixture, fresh, key_type_n, TestEnv};

const KEYS: [&str; 4] = [
    "product:kb-001",
    "product:mouse-002",
    "product:monitor-003",
    "product:untouched",
];

async fn env_with_stale_entries(mode: InvalidationMode) -> TestEnv {
    let env = TestEnv::new(mode).await;
    for key in KEYS {
        env.raw_set(key, r#"{"stale":true}"#).await;
    }
    env
}

/// The document the invalidator should write for a record's new image.
fn document_of(record: &Value) -> String {
    let image: serde_dynamo::Item =
        serde_json::from_value(record["dynamodb"]["NewImage"].clone()).unwrap();
    Document::from_item(&image).unwrap().into_string()
}

async fn replay(env: &TestEnv, name: &str) -> Value {
    let response = env.invalidator.handle(fresh(fixture(name))).await;
    serde_json::to_value(response).unwrap()
}

#[tokio::test]
async fn delete_mode_removes_the_key_for_every_kind_of_record() {
    for name in [
        "insert.json",
        "modify.json",
        "remove.json",
        "ttl-expiry-remove.json",
        "keys-only.json",
        "float-timestamp.json",
    ] {
        let env = env_with_stale_entries(Delete).await;
        assert_eq!(
            replay(&env, name).await,
            json!({"batchItemFailures": []}),
            "{name}"
        );
        assert_eq!(env.raw_get("product:kb-001").await, None, "{name}");
        assert!(env.raw_get("product:untouched").await.is_some(), "{name}");
    }
}

#[tokio::test]
async fn refresh_mode_writes_the_new_image_with_the_normal_ttl() {
    let env = env_with_stale_entries(Refresh).await;
    replay(&env, "modify.json").await;
    let record = &fixture("modify.json")["Records"][0];
    let cached = env.raw_get("product:kb-001").await.unwrap();
    assert_eq!(cached, document_of(record));
    assert_eq!(
        serde_json::from_str::<Value>(&cached).unwrap()["price"],
        json!(99.99)
    );
    let ttl = env.ttl("product:kb-001").await;
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn refresh_mode_deletes_on_remove_and_on_keys_only() {
    for name in ["remove.json", "ttl-expiry-remove.json", "keys-only.json"] {
        let env = env_with_stale_entries(Refresh).await;
        replay(&env, name).await;
        assert_eq!(env.raw_get("product:kb-001").await, None, "{name}");
    }
}

#[tokio::test]
async fn number_keys_map_to_the_same_cache_key_as_the_read_path() {
    for mode in [Delete, Refresh] {
        let env = TestEnv::with_settings(mode, key_type_n()).await;
        env.raw_set("product:42", r#"{"stale":true}"#).await;
        replay(&env, "number-key.json").await;
        let cached = env.raw_get("product:42").await;
        match mode {
            Delete => assert_eq!(cached, None),
            Refresh => assert_eq!(
                cached.unwrap(),
                document_of(&fixture("number-key.json")["Records"][0])
            ),
        }
    }
}

#[tokio::test]
async fn a_mixed_batch_ends_as_its_last_record_per_item_says() {
    let event = fixture("batch-mixed.json");
    let records = event["Records"].as_array().unwrap();
    for mode in [Delete, Refresh] {
        let env = env_with_stale_entries(mode).await;
        assert_eq!(
            replay(&env, "batch-mixed.json").await,
            json!({"batchItemFailures": []})
        );
        // kb-001 and mouse-002 end with a REMOVE.
        assert_eq!(env.raw_get("product:kb-001").await, None);
        assert_eq!(env.raw_get("product:mouse-002").await, None);
        let monitor = env.raw_get("product:monitor-003").await;
        match mode {
            Delete => assert_eq!(monitor, None),
            Refresh => {
                let last = records
                    .iter()
                    .rfind(|r| r["dynamodb"]["Keys"]["productId"]["S"] == "monitor-003")
                    .unwrap();
                assert_eq!(monitor.unwrap(), document_of(last));
            }
        }
        assert!(env.raw_get("product:untouched").await.is_some());
    }
}

#[tokio::test]
async fn a_malformed_record_neither_fails_nor_blocks_the_batch() {
    let env = env_with_stale_entries(Refresh).await;
    assert_eq!(
        replay(&env, "malformed-record.json").await,
        json!({"batchItemFailures": []})
    );
    let records = fixture("malformed-record.json")["Records"].clone();
    assert_eq!(
        env.raw_get("product:kb-001").await.unwrap(),
        document_of(&records[0])
    );
    assert_eq!(
        env.raw_get("product:mouse-002").await.unwrap(),
        document_of(&records[2])
    );
    // The broken record's key was found in its image and deleted: never refreshed from a record
    // whose shape cannot be trusted.
    assert_eq!(env.raw_get("product:monitor-003").await, None);
}

#[tokio::test]
async fn redis_down_reports_the_first_record_for_retry() {
    let mut env = env_with_stale_entries(Delete).await;
    env.redis.stop().await;
    assert_eq!(
        replay(&env, "batch-mixed.json").await,
        json!({"batchItemFailures": [{"itemIdentifier": "111000000000000000101"}]})
    );
    // Lambda retries the batch once Redis is back; the retry succeeds.
    env.redis.restart().await.unwrap();
    env.raw_set("product:kb-001", "{}").await;
    assert_eq!(
        replay(&env, "batch-mixed.json").await,
        json!({"batchItemFailures": []})
    );
    assert_eq!(env.raw_get("product:kb-001").await, None);
}

#[tokio::test]
async fn after_a_data_loss_refreshes_from_older_records_delete_instead() {
    // A restart or a FLUSHALL forgets which records were applied: one created before the loss
    // may be a replay older than an acknowledged change, so it deletes.
    for lose in ["restart", "flushall"] {
        let mut env = TestEnv::new(Refresh).await;
        let old = fixture("modify.json"); // dated long before this test
        replay_event(&env, old.clone()).await;
        let applied = document_of(&old["Records"][0]);
        assert_eq!(
            env.raw_get("product:kb-001").await.unwrap(),
            applied,
            "{lose}"
        );
        match lose {
            "restart" => env.redis.restart().await.unwrap(),
            _ => env.lose_data().await,
        }
        env.raw_set("product:kb-001", r#"{"stale":true}"#).await;
        replay_event(&env, old.clone()).await;
        assert_eq!(env.raw_get("product:kb-001").await, None, "{lose}");
        // A record created after the loss refreshes. The epoch is the invalidator's clock when
        // it first wrote to the slot; this record is dated past it.
        let mut new = fresh(old);
        let later = new["Records"][0]["dynamodb"]["ApproximateCreationDateTime"]
            .as_f64()
            .unwrap()
            + 2.0;
        new["Records"][0]["dynamodb"]["ApproximateCreationDateTime"] = json!(later);
        new["Records"][0]["dynamodb"]["SequenceNumber"] = json!("111000000000000000002");
        replay_event(&env, new.clone()).await;
        assert_eq!(
            env.raw_get("product:kb-001").await.unwrap(),
            document_of(&new["Records"][0]),
            "{lose}"
        );
    }
}

async fn replay_event(env: &TestEnv, event: Value) {
    let response = env.invalidator.handle(event).await;
    assert!(response.batch_item_failures.is_empty());
}

#[tokio::test]
async fn a_ten_thousand_record_batch_is_applied_in_full() {
    // What is checked is that every record lands, not how fast: this debug build renders the
    // documents several times slower than the release functions, whose batch time the
    // benchmark measures, and at the default budget (100 ms per 1,000 keys, counting the
    // rendering) the first of the three parts timed out on a loaded machine, before this
    // change to the budget and after; at 500 ms too, once, beside other suites at a load of 6.
    let env = TestEnv::with_settings(
        Refresh,
        CacheSettings {
            redis_timeout: Duration::from_millis(1000),
            ..CacheSettings::default()
        },
    )
    .await;
    let template = fresh(fixture("modify.json"))["Records"][0].clone();
    let records: Vec<Value> = (0..10_000)
        .map(|i| {
            let item = i;
            let mut r = template.clone();
            r["dynamodb"]["Keys"]["productId"] = json!({"S": format!("p{item}")});
            r["dynamodb"]["NewImage"]["productId"] = json!({"S": format!("p{item}")});
            r["dynamodb"]["SequenceNumber"] = json!(format!("{}", 100_000 + i));
            r
        })
        .collect();
    let response = env.invalidator.handle(json!({ "Records": records })).await;
    assert!(response.batch_item_failures.is_empty());
    for i in [0, 4_999, 9_999] {
        let cached = env.raw_get(&format!("product:p{i}")).await.unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&cached).unwrap()["productId"],
            json!(format!("p{i}"))
        );
    }
    let mut conn = env.redis_conn().await;
    let size: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    // Each item's document and its version key, and the epoch keys the test declared.
    assert_eq!(
        size,
        20_000 + usize::from(product_cache::cache::slots::SLOTS)
    );
}

/// A failure names the earliest record whose change is not known to be applied. When that
/// record carries no sequence number, a later one must not be named in its place (Lambda would
/// resume after the unapplied change and never retry it): the nearest earlier one is named, or,
/// with none, the whole batch fails (an empty identifier).
#[tokio::test]
async fn a_failure_never_names_a_record_after_an_unapplied_one() {
    let mut env = env_with_stale_entries(Delete).await;
    let mixed = fresh(fixture("batch-mixed.json"));
    let records = mixed["Records"].as_array().unwrap();
    let without_sequence = |r: &Value| {
        let mut r = r.clone();
        r["dynamodb"]
            .as_object_mut()
            .unwrap()
            .remove("SequenceNumber");
        r
    };
    env.redis.stop().await;
    // The first record has no sequence number: nothing earlier can be named.
    let event = json!({ "Records": [without_sequence(&records[0]), records[1].clone()] });
    let response = serde_json::to_value(env.invalidator.handle(event).await).unwrap();
    assert_eq!(
        response,
        json!({"batchItemFailures": [{"itemIdentifier": ""}]})
    );
    // A record without one after a record with one: the earlier one is named.
    let event = json!({ "Records": [records[0].clone(), without_sequence(&records[1])] });
    let response = serde_json::to_value(env.invalidator.handle(event).await).unwrap();
    let first = records[0]["dynamodb"]["SequenceNumber"].clone();
    assert_eq!(
        response,
        json!({"batchItemFailures": [{"itemIdentifier": first}]})
    );
    env.redis.restart().await.unwrap();
}

/// Delete mode on a single node goes without the apply script (`cache/deletes.rs`): documents
/// and leases are deleted, each key's position recorded, an older or repeated record refused
/// and an unordered one applied, as the script would; and Redis ran no script at all.
#[tokio::test]
async fn delete_mode_on_a_single_node_keeps_the_scripts_rules_without_a_script() {
    let env = TestEnv::new(Delete).await;
    let template = fixture("modify.json")["Records"][0].clone();
    let record = |id: &str, seq: Option<&str>| {
        let mut r = template.clone();
        r["dynamodb"]["Keys"]["productId"] = json!({ "S": id });
        match seq {
            Some(seq) => r["dynamodb"]["SequenceNumber"] = json!(seq),
            None => {
                r["dynamodb"]
                    .as_object_mut()
                    .unwrap()
                    .remove("SequenceNumber");
            }
        }
        r
    };
    for id in ["kb-001", "mouse-002"] {
        env.raw_set(&format!("product:{id}"), r#"{"stale":true}"#)
            .await;
        env.raw_set(&format!("{{product:{id}}}:lease"), "a reader's token")
            .await;
    }
    let mut conn = env.redis_conn().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    replay_event(
        &env,
        json!({ "Records": [
            record("kb-001", Some("200")),
            record("mouse-002", Some("201")),
            record("kb-001", Some("202")),
        ]}),
    )
    .await;
    for id in ["kb-001", "mouse-002"] {
        assert_eq!(env.raw_get(&format!("product:{id}")).await, None, "{id}");
        assert_eq!(
            env.raw_get(&format!("{{product:{id}}}:lease")).await,
            None,
            "{id}: the lease was not cancelled"
        );
    }
    assert_eq!(
        env.raw_get("{product:kb-001}:ver").await.as_deref(),
        Some("S03:202:0")
    );
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!stats.contains("cmdstat_evalsha"), "{stats}");

    // Filled again after the change: an older or a repeated record leaves it alone.
    env.raw_set("product:kb-001", r#"{"fresh":true}"#).await;
    replay_event(&env, json!({ "Records": [record("kb-001", Some("201"))] })).await;
    replay_event(&env, json!({ "Records": [record("kb-001", Some("202"))] })).await;
    assert_eq!(
        env.raw_get("product:kb-001").await.as_deref(),
        Some(r#"{"fresh":true}"#)
    );
    assert_eq!(
        env.raw_get("{product:kb-001}:ver").await.as_deref(),
        Some("S03:202:0")
    );
    // A record without a position always deletes; a newer one deletes and is recorded.
    replay_event(&env, json!({ "Records": [record("kb-001", None)] })).await;
    assert_eq!(env.raw_get("product:kb-001").await, None);
    env.raw_set("product:kb-001", r#"{"fresh":true}"#).await;
    replay_event(&env, json!({ "Records": [record("kb-001", Some("1000"))] })).await;
    assert_eq!(env.raw_get("product:kb-001").await, None);
    assert_eq!(
        env.raw_get("{product:kb-001}:ver").await.as_deref(),
        Some("S04:1000:0")
    );
}
