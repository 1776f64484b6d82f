//! The operator commands as an operator runs them: the compiled `pcache` against real Redis and
//! moto (DynamoDB, its stream and SQS), pointed at them with `--endpoint` and `--redis-url` as it
//! would be pointed at AWS. A failed batch is injected the way it happens (the invalidator fails
//! against a stopped Redis, Lambda gives up and sends its on-failure record to the queue), and
//! the redrive must leave no stale key behind.

use std::process::Output;
use std::time::{Duration, SystemTime};

use product_cache::config::InvalidationMode::Delete;
use serde_json::{json, Value};

use crate::aws_proxy::{AwsProxy, Behaviour};
use crate::support::{moto_endpoint, TestEnv};

/// `pcache <args>` pointed at this environment; its output, whatever the exit status.
pub(crate) async fn pcache(env: &TestEnv, args: &[&str]) -> Output {
    pcache_at(env, moto_endpoint(), args).await
}

/// `pcache <args>` with AWS at `endpoint` (moto, or a proxy in front of it).
pub(crate) async fn pcache_at(env: &TestEnv, endpoint: &str, args: &[&str]) -> Output {
    pcache_with(env, endpoint, &[], args).await
}

/// `pcache <args>` with AWS at `endpoint` and the variables `vars` set, as the functions'.
async fn pcache_with(
    env: &TestEnv,
    endpoint: &str,
    vars: &[(&str, &str)],
    args: &[&str],
) -> Output {
    let redis_url = env.redis.url();
    let state_dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(crate::support::binary("pcache"));
    cmd.args(args)
        .args(["--endpoint", endpoint, "--redis-url", &redis_url])
        .args(["--table", &env.table])
        // No running stack is looked for: everything it needs is given.
        .arg("--state-dir")
        .arg(state_dir.path())
        .env_remove("REDIS_URL")
        .env_remove("TABLE_NAME")
        .envs(vars.iter().copied())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("pcache finishes")
        .expect("pcache runs")
}

pub(crate) fn text(out: &Output) -> String {
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
pub(crate) async fn failure_record(env: &TestEnv, records: &[Value], age: Duration) -> Value {
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

/// A redrive that applied every record of the three stale products: it succeeded, says so, and
/// each price is the new one. Its output, for the checks a test adds.
async fn assert_redrove_all(run: &Output, env: &TestEnv) -> String {
    let out = text(run);
    assert!(run.status.success(), "{out}");
    assert!(out.contains("applied 3 records"), "{out}");
    assert_eq!(
        prices(env).await,
        vec![json!(20), json!(20), json!(20)],
        "no stale key is left: {out}"
    );
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
    assert_redrove_all(&run, &env).await;
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

async fn send(client: &aws_sdk_sqs::Client, url: &str, record: &Value) {
    client
        .send_message()
        .queue_url(url)
        .message_body(record.to_string())
        .send()
        .await
        .unwrap();
}

/// The bodies of the messages left on the queue (received and made visible again).
async fn bodies(client: &aws_sdk_sqs::Client, url: &str) -> Vec<String> {
    let out = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();
    out.messages
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.body)
        .collect()
}

/// Three stale products, the batch of their changes lost and its on-failure record on the
/// queue: the situation every redrive test starts from.
async fn one_lost_batch(env: &mut TestEnv) -> (aws_sdk_sqs::Client, String) {
    let records = stale_products(env).await;
    let (client, url) = sqs(env).await;
    let record = failure_record(env, &records, Duration::from_secs(60)).await;
    send(&client, &url, &record).await;
    (client, url)
}

#[tokio::test]
async fn a_redrive_reads_a_range_through_empty_pages_in_its_middle_and_applies_it_whole() {
    let mut env = TestEnv::new(Delete).await;
    let (client, url) = one_lost_batch(&mut env).await;
    // One record per page, and three empty pages before each page after the first.
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            empty_pages: 3,
            page_limit: Some(1),
            ..Behaviour::default()
        },
    )
    .await;
    let run = pcache_at(
        &env,
        &proxy.endpoint(),
        &["redrive", "--queue-url", &url, "--wait-seconds", "1"],
    )
    .await;
    assert_redrove_all(&run, &env).await;
    assert!(proxy.counts().empty_pages >= 6, "{:?}", proxy.counts());
    assert_eq!(queued(&client, &url).await, 0, "the record is removed");
}

#[tokio::test]
async fn an_empty_first_page_does_not_make_a_readable_range_unrecoverable() {
    let mut env = TestEnv::new(Delete).await;
    let records = stale_products(&mut env).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("on-failure.jsonl");
    let record = failure_record(&env, &records, Duration::from_secs(60)).await;
    std::fs::write(&file, format!("{record}\n")).unwrap();
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            empty_pages: 2,
            empty_first_page: true,
            ..Behaviour::default()
        },
    )
    .await;
    let run = pcache_at(
        &env,
        &proxy.endpoint(),
        &["redrive", "--from-file", file.to_str().unwrap()],
    )
    .await;
    let out = assert_redrove_all(&run, &env).await;
    assert!(!out.contains("UNRECOVERABLE"), "{out}");
    assert_eq!(proxy.counts().empty_pages, 2, "{:?}", proxy.counts());
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "",
        "the record is removed"
    );
}

#[tokio::test]
async fn a_range_behind_more_empty_pages_than_the_cap_is_kept_as_not_read() {
    let mut env = TestEnv::new(Delete).await;
    let (client, url) = one_lost_batch(&mut env).await;
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            empty_pages: 1000,
            empty_first_page: true,
            ..Behaviour::default()
        },
    )
    .await;
    let run = pcache_at(
        &env,
        &proxy.endpoint(),
        &[
            "redrive",
            "--queue-url",
            &url,
            "--wait-seconds",
            "1",
            "--max-empty-pages",
            "5",
        ],
    )
    .await;
    let out = text(&run);
    assert!(
        !run.status.success(),
        "a range not read fails the command: {out}"
    );
    assert!(
        out.contains("not read: 5 empty pages in a row"),
        "the command says why: {out}"
    );
    assert!(
        !out.contains("applied") && !out.contains("UNRECOVERABLE"),
        "{out}"
    );
    assert_eq!(proxy.counts().empty_pages, 5, "{:?}", proxy.counts());
    assert_eq!(
        prices(&env).await,
        vec![json!(10), json!(10), json!(10)],
        "nothing of it is applied"
    );
    assert_eq!(queued(&client, &url).await, 1, "the record is kept: {out}");
}

#[tokio::test]
async fn one_failed_delete_is_reported_and_the_other_records_are_still_removed() {
    let mut env = TestEnv::new(Delete).await;
    let records = stale_products(&mut env).await;
    let (client, url) = sqs(&env).await;
    // One on-failure record per change; the first one sent is the one whose delete fails
    // (moto hands messages out in the order they were sent, so it is settled first).
    for (i, record) in records.iter().enumerate() {
        let mut failure =
            failure_record(&env, std::slice::from_ref(record), Duration::from_secs(60)).await;
        if i == 0 {
            failure["requestContext"]["requestId"] = json!("delete-refused");
        }
        send(&client, &url, &failure).await;
    }
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            fail_delete_of: Some("delete-refused".into()),
            ..Behaviour::default()
        },
    )
    .await;
    let run = pcache_at(
        &env,
        &proxy.endpoint(),
        &["redrive", "--queue-url", &url, "--wait-seconds", "1"],
    )
    .await;
    let out = text(&run);
    assert!(
        !run.status.success(),
        "a failed delete fails the command: {out}"
    );
    assert!(out.contains("SQS DeleteMessage of message"), "{out}");
    assert!(
        out.contains("2 of 3 failed batches redriven and removed"),
        "{out}"
    );
    assert_eq!(proxy.counts().failed_deletes, 1, "{:?}", proxy.counts());
    assert_eq!(prices(&env).await, vec![json!(20), json!(20), json!(20)]);
    let left = bodies(&client, &url).await;
    assert_eq!(left.len(), 1, "only the refused one stays: {left:?}\n{out}");
    assert!(left[0].contains("delete-refused"), "{left:?}");
}

#[tokio::test]
async fn the_queue_is_drained_with_long_polls_where_short_polls_answer_nothing() {
    let mut env = TestEnv::new(Delete).await;
    let (client, url) = one_lost_batch(&mut env).await;
    let proxy = AwsProxy::start(
        moto_endpoint(),
        Behaviour {
            empty_short_polls: true,
            ..Behaviour::default()
        },
    )
    .await;
    let run = pcache_at(
        &env,
        &proxy.endpoint(),
        &["redrive", "--queue-url", &url, "--wait-seconds", "1"],
    )
    .await;
    let out = assert_redrove_all(&run, &env).await;
    assert_eq!(proxy.counts().empty_short_polls, 0, "{out}");
    assert_eq!(queued(&client, &url).await, 0, "the record is removed");
}

#[tokio::test]
async fn an_aws_endpoint_that_never_answers_fails_the_command_instead_of_hanging_it() {
    let env = TestEnv::new(Delete).await;
    // Accepts connections and reads requests, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let url = format!("{endpoint}/123456789012/failures");
    let run = pcache_at(
        &env,
        &endpoint,
        &[
            "redrive",
            "--queue-url",
            &url,
            "--wait-seconds",
            "1",
            "--aws-attempt-timeout-ms",
            "300",
            "--aws-timeout-ms",
            "1500",
        ],
    )
    .await;
    let out = text(&run);
    assert!(!run.status.success(), "{out}");
    assert!(out.contains("ReceiveMessage"), "{out}");
    assert!(
        out.to_lowercase().contains("timeout") || out.contains("timed out"),
        "{out}"
    );
}

#[tokio::test]
async fn a_redrive_is_acknowledged_by_the_invalidators_confirmation_rule() {
    use local_stack::proxy::DelayProxy;

    let mut env = TestEnv::new(Delete).await;
    // A replica, attached through a link that can be held: it stays attached but confirms
    // nothing more.
    let primary = (std::net::Ipv4Addr::LOCALHOST, env.redis.port()).into();
    let link = DelayProxy::start(primary, Duration::ZERO).await.unwrap();
    let _replica = crate::support::replica_of_port(env.redis.port(), link.port()).await;
    let (client, url) = one_lost_batch(&mut env).await;
    link.set_delay(Duration::from_secs(3600));

    // The function's variables: one replica must confirm each batch.
    let confirm = [
        ("REDIS_CONFIRM_REPLICAS", "1"),
        ("REDIS_CONFIRM_TIMEOUT_MS", "200"),
    ];
    let args = ["redrive", "--queue-url", &url, "--wait-seconds", "1"];
    let held = pcache_with(&env, moto_endpoint(), &confirm, &args).await;
    let out = text(&held);
    assert!(!held.status.success(), "an unconfirmed batch fails: {out}");
    assert!(out.contains("the cache refused the batch"), "{out}");
    assert_eq!(queued(&client, &url).await, 1, "and its record is kept");

    // Without the rule the same batch is acknowledged on the primary's word.
    let unconfirmed = pcache_with(&env, moto_endpoint(), &[], &args).await;
    let out = text(&unconfirmed);
    assert!(unconfirmed.status.success(), "{out}");
    assert!(out.contains("applied 3 records"), "{out}");
    assert_eq!(queued(&client, &url).await, 0);
}
