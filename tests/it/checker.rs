//! A Jepsen/Polaris-style consistency checker against the real local services: a fresh
//! `redis-server`, a fresh table with a `NEW_AND_OLD_IMAGES` stream on the shared moto, and
//! actors that stop by themselves (after `CHECKER_OPS` operations, or `CHECKER_MAX_SECS`).
//!
//! - **Writers** own the items (one writer per item), so each item's history is known exactly:
//!   `PutItem`/`UpdateItem` with `version` = previous + 1, sometimes a `DeleteItem` (which takes
//!   the next index; the write after it skips one, so versions keep increasing).
//! - **The feeder** does what Lambda's event source mapping does: reads the table's real stream
//!   with [`StreamReader`](local_stack::stream::StreamReader), forms batches, calls
//!   `Invalidator::handle`, honours partial batch responses (retries from the reported sequence
//!   number) and records when each record was first acknowledged. It injects duplicate
//!   deliveries of earlier, acknowledged batches, failures after a prefix of a batch's ops was
//!   applied, and bisections of failed batches.
//! - **Readers** call the real read path (`ReadPath` over `RedisCache` and a consistent
//!   `DynamoStore`); some table reads pause for longer than the lease before the fill.
//! - **Chaos**: one data loss (a Redis restart on the same port, empty, or a `FLUSHALL` with the
//!   server up), a few herds of 200 concurrent reads of a cold key, and in one run a version
//!   attribute turned on mid-run, in the invalidator first and in the readers later.
//!
//! Then it checks the README's invariants:
//! 1. a read that started after the record of write W on X was acknowledged returns W or newer:
//!    `Found(v)` needs `v >=` the newest acknowledged write (`v >` an acknowledged delete);
//!    not-found after an acknowledged write is stale unless a later delete of X had been sent
//!    before the read ended;
//! 2. after the run, every record once more from TRIM_HORIZON changes no `product:*` value (and
//!    (1) holds under duplicates, retries and bisection);
//! 3. once the stream is drained, every cached `product:<id>` equals `Document::from_item` of a
//!    consistent `GetItem` (`null` for an absent item), or is absent;
//! 4. a herd of concurrent misses on a cold key reads the table once per lease period;
//!
//! and prints a report: operations, faults, violations with the first ones in detail, and the
//! staleness distribution (commit of each write to the end of the first read that started
//! after it and saw it or newer).
//!
//! Duplicates are drawn from every acknowledged batch, also from before the data loss, which
//! forgot their positions; `old_records_replayed_after_a_restart` and
//! `no_violations_after_a_flushall` also replay all the batches acknowledged before it, in
//! order. The cache must turn those into deletes.
//!
//! The runs: delete mode, refresh mode, a version attribute, the restart replay, the `FLUSHALL`
//! replay, a version attribute turned on mid-run (the invalidator at a quarter of the run, the
//! readers at half), and two with a guard switched off that must report violations.
//! They are short (`CHECKER_OPS`, default 5,000 operations each, 40,000 in all). The long run
//! is the same entry point, bigger:
//!
//! ```sh
//! CHECKER_OPS=1000000 cargo test --release -p integration-tests --test it \
//!     checker::no_violations_in_refresh_mode -- --nocapture
//! ```
//!
//! `CHECKER_SEED` replays a run's random choices (the seed is printed, timing is not replayed),
//! `CHECKER_MAX_SECS` bounds the run (default 90 s, or 1 s per 2,000 operations), and
//! `CHECKER_READS_PER_WRITE` sets the readers' pace (default 4).

mod actors;
mod chaos;
mod config;
mod faults;
mod feeder;
mod history;
mod invariants;
mod report;
mod run;
mod system;

use product_cache::cache::Guards;
use product_cache::config::InvalidationMode::{Delete, Refresh};

use config::{Config, DataLoss, FlipAt};
use run::run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_violations_in_delete_mode() {
    let report = run(Config::new("no_violations_in_delete_mode", Delete)).await;
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_violations_in_refresh_mode() {
    let report = run(Config::new("no_violations_in_refresh_mode", Refresh)).await;
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_violations_with_a_version_attribute() {
    let report = run(Config {
        version_attribute: Some("version".into()),
        ..Config::new("no_violations_with_a_version_attribute", Refresh)
    })
    .await;
    report.assert_clean();
}

/// Without leases, a slow fill lands after the invalidation it raced: the checker must see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catches_stale_fills_without_leases() {
    let report = run(Config {
        guards: Guards {
            leases: false,
            ordering: true,
        },
        ..Config::new("catches_stale_fills_without_leases", Delete)
    })
    .await;
    report.assert_exercised();
    assert!(
        report.violations[0] > 0,
        "no stale read was reported without leases:\n{}",
        report.text
    );
}

/// Without ordering, a duplicate delivery of an older batch puts old versions back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catches_regressions_without_ordering() {
    let report = run(Config {
        guards: Guards {
            leases: true,
            ordering: false,
        },
        ..Config::new("catches_regressions_without_ordering", Refresh)
    })
    .await;
    report.assert_exercised();
    assert!(
        report.violations[0] > 0,
        "no stale read was reported without ordering:\n{}",
        report.text
    );
}

/// A Redis restart (or a node replaced empty) forgets `{key}:ver`; the event source mapping then
/// resumes from a checkpoint before the restart and replays acknowledged batches in order. In
/// refresh mode those old records must not write their old images back: a refresh from a record
/// created before the Redis instance started is applied as a delete.
///
/// Deterministic form: refresh mode; put `x` v1, deliver its record (acked); put v2, deliver
/// (acked); restart Redis; deliver the v1 batch again → `product:x` must not hold v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_records_replayed_after_a_restart() {
    let report = run(Config {
        replay_after_data_loss: true,
        ..Config::new("old_records_replayed_after_a_restart", Refresh)
    })
    .await;
    report.assert_clean();
}

/// The same with `FLUSHALL` in place of the restart: the server stays up (its uptime and its
/// connections carry on), so only the data can tell it lost the positions. The epoch keys went
/// with them: the first refresh of each slot writes a new epoch, and the replayed records,
/// created before it, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_violations_after_a_flushall() {
    let report = run(Config {
        data_loss: DataLoss::Flushall,
        replay_after_data_loss: true,
        ..Config::new("no_violations_after_a_flushall", Refresh)
    })
    .await;
    report.assert_clean();
}

/// `VERSION_ATTRIBUTE` turned on in a live system, rolled out to the invalidator at a quarter of
/// the run's operations and to the readers at half: in between, the invalidator writes version
/// positions and the readers' fills know only sequence numbers, and every key holds a
/// sequence-number position until its next change (which deletes). (Reads catch up with their
/// pace late in a run, so half the operations is about three fifths of the writes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_violations_when_a_version_attribute_is_turned_on_mid_run() {
    let report = run(Config {
        flip_version_attribute: Some(FlipAt {
            invalidator: 0.25,
            readers: 0.5,
        }),
        ..Config::new(
            "no_violations_when_a_version_attribute_is_turned_on_mid_run",
            Refresh,
        )
    })
    .await;
    report.assert_clean();
}
