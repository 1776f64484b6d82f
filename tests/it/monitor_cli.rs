//! `pcache inspect --changes` as an operator runs it: the compiled binary against a real Redis
//! and moto's table with its stream, pointed at them with `--endpoint` and `--redis-url` as it
//! would be pointed at AWS. Records are made older than the grace by passing `--grace-ms 0`
//! (the monitor still waits the stamps' 1 s precision), never by sleeping.

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use product_cache::config::InvalidationMode::Delete;

use crate::aws_proxy::{AwsProxy, Behaviour};
use crate::operator::{pcache, pcache_at, text};
use crate::support::{moto_endpoint, TestEnv};

const IDS: [&str; 3] = ["mon-1", "mon-2", "mon-3"];

/// What [`planted`] made.
struct Planted {
    /// A time after the products' first writes and before their changes, in an earlier
    /// whole second than the changes (stamps may be rounded down to the second).
    cut: SystemTime,
    /// The stale key's change, and the position the invalidator recorded for it.
    sequence_number: String,
    position: String,
}

/// Three products cached at price 10, then changed to 20, the changes applied by the
/// invalidator (the keys deleted, their positions recorded); then `mon-2`'s key overwritten by
/// hand with its old document: a stale entry that the invalidator's position says is settled.
async fn planted(env: &mut TestEnv) -> Planted {
    for id in IDS {
        env.put_product(id, "10").await;
    }
    env.drain_stream().await;
    for id in IDS {
        assert_eq!(env.http_get(id).await.1, "miss");
    }
    let old = env.raw_get("product:mon-2").await.expect("filled");
    let cut = SystemTime::now();
    let second = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    while second(SystemTime::now()) == second(cut) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in IDS {
        env.put_product(id, "20").await;
    }
    let event = env.new_stream_event().await;
    let response = env.invalidator.handle(event.clone()).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let record = event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dynamodb"]["Keys"]["productId"]["S"] == "mon-2")
        .expect("mon-2's change");
    let sequence_number = record["dynamodb"]["SequenceNumber"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(env.raw_get("product:mon-2").await, None, "applied");
    let position = env
        .raw_get("{product:mon-2}:ver")
        .await
        .expect("a position");
    assert!(position.contains(&sequence_number), "{position}");
    env.raw_set("product:mon-2", &old).await;
    Planted {
        cut,
        sequence_number,
        position,
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The run's output, after checking its exit code.
fn exited(run: &Output, code: i32) -> String {
    let out = text(run);
    assert_eq!(run.status.code(), Some(code), "{out}");
    out
}

/// The summary line that starts with `label` (after its indentation), e.g. "  pending".
fn line<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

/// The count a summary line starts with, after its label.
fn count(out: &str, label: &str) -> usize {
    line(out, label)[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count after {label:?} in:\n{out}"))
}

#[tokio::test]
async fn a_stale_key_after_its_applied_change_is_inconsistent_and_repair_purges_it() {
    let mut env = TestEnv::new(Delete).await;
    let planted = planted(&mut env).await;
    let args = ["inspect", "--changes", "--grace-ms", "0"];

    let out = exited(&pcache(&env, &args).await, 1);
    assert_eq!(count(&out, "records"), 6, "{out}");
    assert_eq!(
        line(&out, "records"),
        "records       6 read, 6 in the range"
    );
    assert_eq!(count(&out, "changes"), 3, "each key on its newest change");
    assert_eq!(count(&out, "  consistent"), 2, "{out}");
    assert_eq!(count(&out, "  pending"), 0, "{out}");
    assert_eq!(count(&out, "  INCONSISTENT"), 1, "{out}");
    let listed = format!(
        "    product:mon-2  sequence {}  cached position {}",
        planted.sequence_number, planted.position
    );
    assert!(out.lines().any(|l| l == listed), "{listed:?} in:\n{out}");
    assert_eq!(count(&out, "repaired"), 0, "{out}");
    assert!(
        env.raw_get("product:mon-2").await.is_some(),
        "left in place"
    );

    let repair = [&args[..], &["--repair"]].concat();
    let out = exited(&pcache(&env, &repair).await, 0);
    assert_eq!(count(&out, "  INCONSISTENT"), 1, "{out}");
    assert_eq!(count(&out, "repaired"), 1, "{out}");
    assert_eq!(env.raw_get("product:mon-2").await, None, "purged: {out}");

    let out = exited(&pcache(&env, &args).await, 0);
    assert_eq!(count(&out, "  INCONSISTENT"), 0, "{out}");
    assert_eq!(count(&out, "  consistent"), 3, "{out}");
}

#[tokio::test]
async fn changes_a_lagging_invalidator_has_not_applied_are_pending_not_inconsistent() {
    let mut env = TestEnv::new(Delete).await;
    for id in IDS {
        env.put_product(id, "10").await;
    }
    env.drain_stream().await;
    for id in IDS {
        assert_eq!(env.http_get(id).await.1, "miss");
    }
    // Changed, and the stream never given to the invalidator: every key still holds price 10.
    for id in IDS {
        env.put_product(id, "20").await;
    }
    let run = pcache(&env, &["inspect", "--changes", "--grace-ms", "0"]).await;
    let out = exited(&run, 0);
    assert_eq!(count(&out, "records"), 6, "{out}");
    assert_eq!(count(&out, "  pending"), 3, "{out}");
    assert!(
        line(&out, "  pending").contains("the invalidator lags"),
        "{out}"
    );
    assert_eq!(count(&out, "  INCONSISTENT"), 0, "{out}");
    assert_eq!(count(&out, "  consistent"), 0, "{out}");
    for id in IDS {
        let cached = env.raw_get(&format!("product:{id}")).await.unwrap();
        assert!(cached.contains(r#""price":10"#), "left alone: {cached}");
    }
}

#[tokio::test]
async fn records_outside_since_and_until_are_left_out() {
    let mut env = TestEnv::new(Delete).await;
    let planted = planted(&mut env).await;
    let cut = rfc3339(planted.cut);

    // Up to the cut: the first writes only. mon-2, judged on its first write, holds the
    // document that write made (and its position is past it anyway).
    let before = ["inspect", "--changes", "--grace-ms", "0", "--until", &cut];
    let out = exited(&pcache(&env, &before).await, 0);
    assert_eq!(count(&out, "records"), 6, "{out}");
    assert!(line(&out, "records").ends_with(" 3 in the range"), "{out}");
    assert_eq!(count(&out, "changes"), 3, "{out}");
    assert_eq!(count(&out, "  INCONSISTENT"), 0, "{out}");

    // From the cut: the changes only, the planted one among them.
    let after = ["inspect", "--changes", "--grace-ms", "0", "--since", &cut];
    let out = exited(&pcache(&env, &after).await, 1);
    assert!(line(&out, "records").ends_with(" 3 in the range"), "{out}");
    assert_eq!(count(&out, "  INCONSISTENT"), 1, "{out}");
    assert!(out.contains("    product:mon-2  sequence "), "{out}");

    // Relative: an hour that ended an hour ago holds none of them.
    let old = ["inspect", "--changes", "--since", "2h", "--until", "1h"];
    let out = exited(&pcache(&env, &old).await, 0);
    assert!(line(&out, "records").ends_with(" 0 in the range"), "{out}");
    assert_eq!(count(&out, "changes"), 0, "{out}");
}

#[tokio::test]
async fn the_stream_is_read_through_empty_pages_in_its_middle_up_to_the_ranges_end() {
    let mut env = TestEnv::new(Delete).await;
    let planted = planted(&mut env).await;
    // One record a page, and three empty pages before each page after the first.
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
        &["inspect", "--changes", "--grace-ms", "0"],
    )
    .await;
    let out = exited(&run, 1);
    assert_eq!(
        line(&out, "records"),
        "records       6 read, 6 in the range"
    );
    assert_eq!(count(&out, "  INCONSISTENT"), 1, "{out}");
    assert!(proxy.counts().empty_pages >= 15, "{:?}", proxy.counts());

    // The read stops at the first record past the range: the fourth, a page of its own.
    let cut = rfc3339(planted.cut);
    let run = pcache_at(
        &env,
        &proxy.endpoint(),
        &["inspect", "--changes", "--grace-ms", "0", "--until", &cut],
    )
    .await;
    let out = exited(&run, 0);
    assert_eq!(
        line(&out, "records"),
        "records       4 read, 3 in the range"
    );
}
