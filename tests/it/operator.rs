//! The operator commands as an operator runs them: the compiled `pcache` against real Redis and
//! moto (DynamoDB, its stream and SQS), pointed at them with `--endpoint` and `--redis-url` as it
//! would be pointed at AWS. A failed batch is injected the way it happens (the invalidator fails
//! against a stopped Redis, Lambda gives up and sends its on-failure record to the queue), and
//! the redrive must leave no stale key behind.

use std::process::Output;
use std::time::{Duration, SystemTime};

use product_cache::config::InvalidationMode::Delete;
use serde_json::{json, Value};

use crate::support::{moto_endpoint, TestEnv};

/// `pcache <args>` pointed at this environment; its output, whatever the exit status.
async fn pcache(env: &TestEnv, args: &[&str]) -> Output {
    let redis_url = env.redis.url();
    let state_dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(crate::support::binary("pcache"));
    cmd.args(args)
        .args(["--endpoint", moto_endpoint(), "--redis-url", &redis_url])
        .args(["--table", &env.table])
        // No running stack is looked for: everything it needs is given.
        .arg("--state-dir")
        .arg(state_dir.path())
        .env_remove("REDIS_URL")
        .env_remove("TABLE_NAME")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("pcache finishes")
        .expect("pcache runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Three cached products whose prices then change in the table; the changes' records are
/// returned, not applied: the cache still holds the old prices.
async fn stale_products(env: &mut TestEnv) -> Vec<Value> {
    for id in ["op-1", "op-2", "op-3"] {
        env.put_product(id, "10").await;
    }
    env.drain_stream().await;
    for id in ["op-1", "op-2", "op-3"] {
        let (_, x_cache, body) = env.http_get(id).await;
        assert_eq!((x_cache.as_str(), &body["price"]), ("miss", &json!(10)));
    }
    for id in ["op-1", "op-2", "op-3"] {
        env.put_product(id, "20").await;
    }
    let event = env.new_stream_event().await;
    event["Records"].as_array().unwrap().clone()
}

/// Lambda's on-failure record for `records` (its SQS message body), the last one having
/// reached the stream `age` ago.
async fn failure_record(env: &TestEnv, records: &[Value], age: Duration) -> Value {
    let shards = env.stream.shards().await.unwrap();
    assert_eq!(shards.len(), 1, "moto's stream has one shard");
    let seq = |r: &Value| r["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned();
    let arrived = humantime::format_rfc3339_millis(SystemTime::now() - age).to_string();
    json!({
        "requestContext": {
            "requestId": "4f1b2c9e-0000-4000-8000-000000000000",
            "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:invalidator",
            "condition": "RetryAttemptsExhausted",
            "approximateInvokeCount": 3
        },
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "version": "1.0",
        "timestamp": arrived,
        "DDBStreamBatchInfo": {
            "shardId": shards[0].shard_id,
            "startSequenceNumber": seq(&records[0]),
            "endSequenceNumber": seq(&records[records.len() - 1]),
            "approximateArrivalOfFirstRecord": arrived,
            "approximateArrivalOfLastRecord": arrived,
            "batchSize": records.len(),
            "streamArn": env.stream.stream_arn()
        }
    })
}

async fn sqs(env: &TestEnv) -> (aws_sdk_sqs::Client, String) {
    let client = aws_sdk_sqs::Client::new(&env.sdk);
    let url = client
        .create_queue()
        .queue_name(format!("{}-failures", env.table))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    (client, url)
}

async fn queued(client: &aws_sdk_sqs::Client, url: &str) -> usize {
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    attrs.values().map(|v| v.parse::<usize>().unwrap()).sum()
}

async fn prices(env: &TestEnv) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ["op-1", "op-2", "op-3"] {
        out.push(env.http_get(id).await.2["price"].clone());
    }
    out
}

#[tokio::test]
async fn a_redrive_from_the_queue_after_a_failed_batch_leaves_no_stale_key() {
    let mut env = TestEnv::new(Delete).await;
    let records = stale_products(&mut env).await;
    // The injected failure: the invalidator cannot reach Redis (nothing listens where it
    // looks), so it reports the batch failed, and Lambda, its retries exhausted, gives up.
    let nowhere = format!("redis://127.0.0.1:{}", local_stack::services::free_port());
    let unreachable = product_cache::invalidate::Invalidator::build(
        product_cache::config::InvalidatorSettings {
            redis: product_cache::config::RedisSettings::new(nowhere),
            mode: Delete,
            cache: env.settings.clone(),
        },
        &env.sdk,
    )
    .await
    .unwrap();
    let response = unreachable
        .handle(local_stack::stream::lambda_event(records.clone()))
        .await;
    assert_eq!(response.batch_item_failures.len(), 1);
    assert_eq!(
        prices(&env).await,
        vec![json!(10), json!(10), json!(10)],
        "stale: the change was lost"
    );

    let (client, url) = sqs(&env).await;
    let record = failure_record(&env, &records, Duration::from_secs(60)).await;
    client
        .send_message()
        .queue_url(&url)
        .message_body(record.to_string())
        .send()
        .await
        .unwrap();

    let dry = pcache(&env, &["redrive", "--queue-url", &url, "--dry-run"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("would apply 3 records"),
        "{}",
        text(&dry)
    );
    assert_eq!(
        prices(&env).await,
        vec![json!(10), json!(10), json!(10)],
        "a dry run changes nothing"
    );
    assert_eq!(queued(&client, &url).await, 1, "and keeps the record");

    let run = pcache(&env, &["redrive", "--queue-url", &url]).await;
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("applied 3 records"), "{}", text(&run));
    assert_eq!(
        prices(&env).await,
        vec![json!(20), json!(20), json!(20)],
        "no stale key is left"
    );
    assert_eq!(queued(&client, &url).await, 0, "the record is removed");
}

#[tokio::test]
async fn a_redrive_past_retention_purges_what_a_kept_payload_names_and_reports_the_rest() {
    let mut env = TestEnv::new(Delete).await;
    let records = stale_products(&mut env).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("on-failure.jsonl");
    let two_days = Duration::from_secs(48 * 3600);
    // One record as an S3 destination keeps it (with the batch), one as SQS sends it (without).
    let mut kept = failure_record(&env, &records[..2], two_days).await;
    kept["payload"] = json!({"Records": records[..2]}).to_string().into();
    let bare = failure_record(&env, &records[2..], two_days).await;
    std::fs::write(&file, format!("{kept}\n{bare}\n")).unwrap();
    let path = file.to_str().unwrap();

    let run = pcache(&env, &["redrive", "--from-file", path]).await;
    assert!(
        !run.status.success(),
        "an unrecoverable batch fails the command"
    );
    let out = text(&run);
    assert!(out.contains("past retention: purged 2 keys"), "{out}");
    assert!(out.contains("UNRECOVERABLE"), "{out}");
    assert_eq!(env.raw_get("product:op-1").await, None, "{out}");
    assert_eq!(env.raw_get("product:op-2").await, None, "{out}");
    assert!(
        env.raw_get("product:op-3").await.is_some(),
        "nothing names it"
    );
    let left = std::fs::read_to_string(&file).unwrap();
    assert_eq!(left.lines().count(), 1, "only the unrecovered record stays");
    assert!(!left.contains("payload"), "{left}");
}

#[tokio::test]
async fn inspect_shows_both_sides_and_repairs_and_purge_has_a_dry_run() {
    let mut env = TestEnv::new(Delete).await;
    stale_products(&mut env).await;
    // Only op-2's change is lost; the others are applied.
    env.raw_del("product:op-1").await;
    env.raw_del("product:op-3").await;
    assert_eq!(env.http_get("op-1").await.2["price"], json!(20));

    let look = pcache(
        &env,
        &["inspect", "op-1", "op-2", "op-3", "--grace-ms", "200"],
    )
    .await;
    assert!(!look.status.success(), "an inconsistency fails inspect");
    let out = text(&look);
    assert!(out.contains("INCONSISTENT   product:op-2"), "{out}");
    assert!(out.contains("consistent     product:op-1"), "{out}");
    assert!(out.contains("not cached     product:op-3"), "{out}");
    assert!(
        out.contains(r#""price":10"#) && out.contains(r#""price":20"#),
        "{out}"
    );

    let repair = pcache(
        &env,
        &["inspect", "--sample", "50", "--grace-ms", "200", "--repair"],
    )
    .await;
    assert!(repair.status.success(), "{}", text(&repair));
    assert!(text(&repair).contains("1 repaired"), "{}", text(&repair));
    assert_eq!(env.raw_get("product:op-2").await, None);

    // Purge: a dry run deletes nothing; the real one deletes the keys and their leases.
    env.raw_set("{product:op-1}:lease", "someone").await;
    let dry = pcache(&env, &["purge", "op-1", "--dry-run"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("would purge product:op-1"),
        "{}",
        text(&dry)
    );
    assert!(env.raw_get("product:op-1").await.is_some());
    let purge = pcache(&env, &["purge", "op-1", "op-3"]).await;
    assert!(purge.status.success(), "{}", text(&purge));
    assert!(
        text(&purge).contains("purged 2 keys (1 held a value)"),
        "{}",
        text(&purge)
    );
    assert_eq!(env.raw_get("product:op-1").await, None);
    assert_eq!(env.raw_get("{product:op-1}:lease").await, None);
    let bad = pcache(&env, &["purge", "{bad}"]).await;
    assert!(
        !bad.status.success() && text(&bad).contains("{bad}"),
        "{}",
        text(&bad)
    );
}
