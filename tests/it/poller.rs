//! The local event source mapping against the table's real stream: retries, bisection, limits and
//! ordering, with a scripted function standing in for the invalidator.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use local_stack::poller::{EsmConfig, FnFunction, Poller, StartingPosition};
use product_cache::config::InvalidationMode::Delete;
use serde_json::{json, Value};

use crate::support::TestEnv;

/// Writes `n` changes over three items and returns the env (its stream holds `n` records).
async fn env_with_changes(n: usize) -> TestEnv {
    let env = TestEnv::new(Delete).await;
    for i in 0..n {
        env.put_product(&format!("item-{}", i % 3), &format!("{}.5", 10 + i))
            .await;
    }
    env
}

fn config() -> EsmConfig {
    EsmConfig {
        poll_interval: Duration::from_millis(20),
        ..EsmConfig::default()
    }
}

fn seqs(event: &Value) -> Vec<String> {
    event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs `poller` until `done` holds, polling the condition; fails after a deadline.
async fn run_until<F: local_stack::poller::BatchFunction>(
    poller: &Poller<F>,
    done: impl Fn() -> bool,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "poller did not finish"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(()).unwrap();
    };
    let (result, ()) = tokio::join!(
        poller.run(async {
            stop_rx.await.ok();
        }),
        watcher
    );
    result.unwrap();
}

/// Every delivered batch, as sequence numbers.
#[derive(Default)]
struct Log(Mutex<Vec<Vec<String>>>);

impl Log {
    fn push(&self, event: &Value) -> usize {
        let mut log = self.0.lock().unwrap();
        log.push(seqs(event));
        log.len()
    }
    fn batches(&self) -> Vec<Vec<String>> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_reported_failure_redelivers_that_record_and_the_rest_in_order() {
    let env = env_with_changes(10).await;
    let log = Log::default();
    let poller = Poller::new(
        env.stream.clone(),
        config(),
        FnFunction(|event: Value| {
            let n = log.push(&event);
            let s = seqs(&event);
            async move {
                // The first delivery fails at its fourth record.
                Ok(if n == 1 {
                    json!({"batchItemFailures": [{"itemIdentifier": s[3]}]})
                } else {
                    json!({"batchItemFailures": []})
                })
            }
        }),
    );
    let stats = poller.stats();
    run_until(&poller, || {
        stats.records_acknowledged.load(Ordering::SeqCst) == 10
    })
    .await;

    let batches = log.batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[0].len(), 10);
    assert_eq!(batches[1], batches[0][3..].to_vec());
    assert_eq!(stats.partial_failures.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_empty_or_unknown_identifier_fails_the_whole_batch() {
    let env = env_with_changes(4).await;
    let log = Log::default();
    let poller = Poller::new(
        env.stream.clone(),
        config(),
        FnFunction(|event: Value| {
            let n = log.push(&event);
            async move {
                Ok(match n {
                    1 => json!({"batchItemFailures": [{"itemIdentifier": ""}]}),
                    2 => json!({"batchItemFailures": [{"itemIdentifier": "no-such-record"}]}),
                    _ => json!({}),
                })
            }
        }),
    );
    let stats = poller.stats();
    run_until(&poller, || {
        stats.records_acknowledged.load(Ordering::SeqCst) == 4
    })
    .await;
    let batches = log.batches();
    assert_eq!(batches.len(), 3);
    assert!(batches.iter().all(|b| b.len() == 4), "{batches:?}");
}

#[tokio::test]
async fn bisect_halves_a_failing_batch() {
    let env = env_with_changes(8).await;
    let log = Log::default();
    let failures_left = std::sync::atomic::AtomicUsize::new(2);
    let mut cfg = config();
    cfg.bisect_on_error = true;
    let poller = Poller::new(
        env.stream.clone(),
        cfg,
        FnFunction(|event: Value| {
            log.push(&event);
            let all = log.batches();
            let poison = all[0][5].clone();
            // A function error while the batch holds the sixth record, twice.
            let fails = seqs(&event).contains(&poison)
                && failures_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            async move {
                if fails {
                    Err("boom".to_owned())
                } else {
                    Ok(json!({"batchItemFailures": []}))
                }
            }
        }),
    );
    let stats = poller.stats();
    run_until(&poller, || {
        stats.records_acknowledged.load(Ordering::SeqCst) == 8
    })
    .await;
    let sizes: Vec<usize> = log.batches().iter().map(Vec::len).collect();
    // 8 fails -> [0..4] ok, [4..8] fails -> [4..6] ok, [6..8] ok.
    assert_eq!(sizes, [8, 4, 4, 2, 2]);
    let batches = log.batches();
    assert_eq!(batches[1], batches[0][..4].to_vec());
    assert_eq!(batches[3], batches[0][4..6].to_vec());
    assert_eq!(stats.function_errors.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn records_past_their_retries_go_to_the_on_failure_file() {
    let env = env_with_changes(5).await;
    let dir = tempfile::tempdir().unwrap();
    let on_failure = dir.path().join("on-failure.jsonl");
    let mut cfg = config();
    cfg.max_retry_attempts = Some(2);
    cfg.on_failure = Some(on_failure.clone());
    let log = Log::default();
    let poller = Poller::new(
        env.stream.clone(),
        cfg,
        FnFunction(|event: Value| {
            log.push(&event);
            let poison = log.batches()[0][2].clone();
            let s = seqs(&event);
            async move {
                // The third record always fails.
                Ok(if s.contains(&poison) {
                    json!({"batchItemFailures": [{"itemIdentifier": poison}]})
                } else {
                    json!({"batchItemFailures": []})
                })
            }
        }),
    );
    let stats = poller.stats();
    run_until(&poller, || {
        stats.records_given_up.load(Ordering::SeqCst) == 3
    })
    .await;
    let batches = log.batches();
    // One delivery and two retries of the records from the failure on.
    assert_eq!(batches.len(), 3, "{batches:?}");
    assert_eq!(batches[1], batches[0][2..].to_vec());
    assert_eq!(batches[2], batches[0][2..].to_vec());
    assert_eq!(stats.records_acknowledged.load(Ordering::SeqCst), 2);

    let text = std::fs::read_to_string(&on_failure).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    let info = &lines[0]["DDBStreamBatchInfo"];
    assert_eq!(info["startSequenceNumber"], json!(batches[0][2]));
    assert_eq!(info["endSequenceNumber"], json!(batches[0][4]));
    assert_eq!(info["batchSize"], json!(3));
    assert_eq!(info["streamArn"], json!(env.stream.stream_arn()));
    assert_eq!(
        lines[0]["requestContext"]["condition"],
        "RetryAttemptsExhausted"
    );
    assert_eq!(
        lines[0]["requestContext"]["approximateInvokeCount"],
        json!(3)
    );
}

#[tokio::test]
async fn records_older_than_the_age_limit_are_given_up_unread() {
    let env = env_with_changes(3).await;
    let dir = tempfile::tempdir().unwrap();
    let on_failure = dir.path().join("on-failure.jsonl");
    let mut cfg = config();
    cfg.max_record_age = Some(Duration::ZERO);
    cfg.on_failure = Some(on_failure.clone());
    let log = Log::default();
    let poller = Poller::new(
        env.stream.clone(),
        cfg,
        FnFunction(|event: Value| {
            log.push(&event);
            async { Ok(json!({})) }
        }),
    );
    let stats = poller.stats();
    run_until(&poller, || {
        stats.records_given_up.load(Ordering::SeqCst) == 3
    })
    .await;
    assert!(log.batches().is_empty(), "expired records were delivered");
    let text = std::fs::read_to_string(&on_failure).unwrap();
    assert!(text.contains("RecordAgeExceeded"), "{text}");
}

#[tokio::test]
async fn latest_skips_what_was_written_before_the_start() {
    let env = env_with_changes(3).await;
    let log = Log::default();
    let mut cfg = config();
    cfg.starting_position = StartingPosition::Latest;
    let poller = Poller::new(
        env.stream.clone(),
        cfg,
        FnFunction(|event: Value| {
            log.push(&event);
            async { Ok(json!({})) }
        }),
    );
    let stats = poller.stats();
    let writer = async {
        // Write only once the poller has taken its LATEST iterator (its first empty poll).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.polls.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        env.put_product("late", "1").await;
    };
    let run = run_until(&poller, || {
        stats.records_acknowledged.load(Ordering::SeqCst) >= 1
    });
    tokio::join!(writer, run);
    let batches = log.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(
        batches[0].len(),
        1,
        "records from before the start were delivered"
    );
}

#[tokio::test]
async fn batches_respect_batch_size_and_keep_every_items_order() {
    let env = env_with_changes(25).await;
    let mut cfg = config();
    cfg.batch_size = 10;
    let delivered = Mutex::new(Vec::<Value>::new());
    let poller = Poller::new(
        env.stream.clone(),
        cfg,
        FnFunction(|event: Value| {
            delivered
                .lock()
                .unwrap()
                .extend(event["Records"].as_array().unwrap().iter().cloned());
            let size = event["Records"].as_array().unwrap().len();
            async move {
                assert!(size <= 10, "batch of {size}");
                Ok(json!({}))
            }
        }),
    );
    let stats = poller.stats();
    run_until(&poller, || {
        stats.records_acknowledged.load(Ordering::SeqCst) == 25
    })
    .await;
    let delivered = delivered.into_inner().unwrap();
    assert_eq!(delivered.len(), 25, "a record was skipped or repeated");
    for item in ["item-0", "item-1", "item-2"] {
        let prices: Vec<f64> = delivered
            .iter()
            .filter(|r| r["dynamodb"]["Keys"]["productId"]["S"] == item)
            .map(|r| {
                r["dynamodb"]["NewImage"]["price"]["N"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(prices.windows(2).all(|w| w[0] < w[1]), "{item}: {prices:?}");
    }
    assert!(stats.invocations.load(Ordering::SeqCst) >= 3);
}
