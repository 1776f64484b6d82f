//! Issue 19's change monitor as a benchmark figure: 100,000 products in moto's table, each one's
//! document cached in the single node as a fill leaves it (`SET` with the read path's TTL), a
//! steady stream of price changes applied by the invalidator (refresh mode, through the event
//! source mapping the SAM template declares), and the monitor as the stream's second reader
//! with the production settings of `ChangeMonitorMapping` (BatchSize 1000, a 10 s window, one
//! batch at a time) and `INSPECT_GRACE_MS` 5 s.
//!
//! One stale entry is planted by a simulated race: product X changes, and right after the
//! invalidator has applied the change, X's previous document is written back (a fill that read
//! the table before the change and lost its race to the invalidator). X's change is written the
//! moment the mapping hands the monitor a batch: the least favourable moment, as X's record then
//! waits out that batch's grace before the mapping gathers the next window.
//!
//! Judged:
//! - the time from the plant until the monitor reports X inconsistent, against the issue's
//!   budget of one grace plus one run, a run of the monitor being what its mapping and its
//!   check make one cycle of: a window of gathering, then the batch's wait until its newest
//!   change is a grace (+ the stamps' 1 s precision) old. A change made while a check waits
//!   (the mapping hands a shard one batch at a time) waits out that check first: one grace
//!   (+ 1 s), one run (window + grace + 1 s), plus 1 s (the mapping polls every 250 ms, so a
//!   window's batch leaves up to 250 ms after it closes; moto's `GetRecords` and the check's
//!   own pipelined `GET`s and `BatchGetItem` take the rest). Beside it, the
//!   random sampler (`Inspector::run(Target::Sample(200))`, same grace) runs back to back from
//!   the plant until the monitor has reported X (and at least a minimum of runs): whether and in
//!   which run it found X, and the expectation (catalog / sample runs, at the production
//!   5-minute schedule);
//! - the monitor's Redis commands per change judged: `INFO commandstats` over a second pass of
//!   every batch the monitor judged, made once the stream, the invalidator, the writer and the
//!   sampler have stopped, so nothing else reaches Redis (Redis 7.0 keeps no per-client or
//!   per-user command counts); the sampler's commands per key checked, measured alone the same
//!   way, beside it;
//! - the monitor's table reads per change judged in the live run (counted around its own
//!   store), against the sampler's per key checked;
//! - false alarms: changes the monitor judged inconsistent other than X's.
//!
//! Loopback only: what is measured is seconds of batching and grace and counts of commands and
//! reads, which a proxy's 0.5 ms would not change.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_stack::poller::{BatchFunction, EsmConfig, Poller, StartingPosition};
use local_stack::stream::StreamReader;
use product_cache::cache::RedisCache;
use product_cache::config::{
    AwsTimeouts, CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings,
};
use product_cache::document::Document;
use product_cache::inspect::{InspectSettings, Inspector, Target, Verdict};
use product_cache::invalidate::Invalidator;
use product_cache::monitor::{ChangeReport, ChangeVerdict};
use product_cache::store::DynamoStore;
use redis::AsyncCommands as _;
use serde_json::{json, Value};

use super::flash_sale::{in_background, lag_summary, seeded_table, Timed};
use crate::counting::{Counting, Counts};
use crate::env::Env;
use crate::records::now_secs;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, percentile, Mix};
use crate::{Error, Sizes};

const FIGURE: &str = "change-monitor";

/// `ChangeMonitorMapping` in infra/template.yaml.
const WINDOW: Duration = Duration::from_secs(10);
const BATCH_SIZE: usize = 1000;
/// `INSPECT_GRACE_MS`'s default, the template's `InspectorGraceMs`.
const GRACE: Duration = Duration::from_secs(5);
/// DynamoDB rounds `ApproximateCreationDateTime` down to the second; the monitor waits it out.
const STAMP_PRECISION: Duration = Duration::from_secs(1);
/// Past one grace and one run: the mapping's 250 ms poll, moto's `GetRecords` and the check's
/// own reads (see the module doc).
const ALLOWANCE: Duration = Duration::from_secs(1);
/// `INSPECT_SAMPLE`'s default.
const SAMPLE: usize = 200;
/// The template's `InspectorIntervalMinutes` default.
const SCHEDULE: Duration = Duration::from_secs(5 * 60);
/// How long after the plant the figure waits for the monitor's report before giving up.
const GIVE_UP: Duration = Duration::from_secs(60);

/// One batch the monitor judged.
struct Check {
    records: Vec<Value>,
    /// When the mapping handed it over, and when its check returned (also as epoch seconds).
    handed: Instant,
    done: Instant,
    done_secs: f64,
    report: ChangeReport,
}

/// The inspector function as the monitor's mapping invokes it with a batch, keeping what each
/// check reported and when.
struct Monitoring {
    inspector: Inspector<Counting>,
    /// Batches handed over so far (bumped as a check starts).
    handed: tokio::sync::watch::Sender<u64>,
    checks: Mutex<Vec<Check>>,
}

impl BatchFunction for Monitoring {
    async fn invoke(&self, mut event: Value) -> Result<Value, String> {
        let records = match event["Records"].take() {
            Value::Array(records) => records,
            _ => Vec::new(),
        };
        let handed = Instant::now();
        self.handed.send_modify(|n| *n += 1);
        let report = self.inspector.check_changes(&records).await;
        self.checks.lock().unwrap().push(Check {
            records,
            handed,
            done: Instant::now(),
            done_secs: now_secs(),
            report,
        });
        // The function never fails a batch; the mapping has no ReportBatchItemFailures.
        Ok(json!({}))
    }
}

impl Monitoring {
    /// The index of the first check that reported `key` inconsistent.
    fn found(&self, key: &str) -> Option<usize> {
        self.checks
            .lock()
            .unwrap()
            .iter()
            .position(|c| c.report.inconsistent().any(|k| k == key))
    }
}

/// Stops the writer and the stream's readers when the figure ends early (an error): they would
/// go on loading moto and Redis under the figures after it. The normal end stops them first.
struct Background {
    writing: Arc<AtomicBool>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Background {
    fn drop(&mut self) {
        self.writing.store(false, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the random sampler did from the plant on.
#[derive(Default)]
struct Sampling {
    runs: usize,
    took: Vec<f64>,
    /// The run (1-based) that found X, and how long after the plant it returned.
    found: Option<(usize, Duration)>,
    keys_checked: usize,
    /// Keys other than X it reported inconsistent.
    other_inconsistent: usize,
}

pub async fn run(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    if net == Net::Proxy {
        return Ok(Vec::new());
    }
    env.flushall().await?;
    // VERSION_ATTRIBUTE unset, the template's default: positions are the stream's sequence
    // numbers, from which the monitor infers how far the invalidator has got.
    let settings = CacheSettings::default();
    let url = env.url(net);
    let table = format!("bench-monitor-{}", std::process::id());
    let products = local_stack::seed::catalog(sizes.monitor_products);
    eprintln!(
        "bench: {FIGURE}: seeding {} products into moto ...",
        products.len()
    );
    let (stream_arn, seeding) = seeded_table(env, &table, &products).await?;

    // The invalidator first: a Redis declared empty, so its refreshes write (see flash-sale).
    let invalidator = Invalidator::build(
        InvalidatorSettings {
            redis: RedisSettings::new(&url),
            mode: InvalidationMode::Refresh,
            cache: settings.clone(),
        },
        &env.sdk,
    )
    .await?;
    invalidator.cache().declare_empty().await?;
    // Every product cached as a fill leaves it: its document, with the read path's TTL.
    let started = Instant::now();
    let mut control = env.control();
    let ttl = settings.ttl.as_secs();
    for chunk in products.chunks(2000) {
        let mut pipe = redis::pipe();
        for p in chunk {
            let item = serde_dynamo::Item::from(p.item(&settings.key_attribute)).into_inner();
            let doc = Document::from_item(&item)?.into_string();
            pipe.set_ex(format!("{}{}", settings.key_prefix, p.id), doc, ttl)
                .ignore();
        }
        pipe.query_async::<()>(&mut control).await?;
    }
    let caching = started.elapsed();
    let ids: Arc<Vec<String>> = Arc::new(products.into_iter().map(|p| p.id).collect());

    // Both inspectors read the table with a 10 s attempt: they are judged on what they find and
    // count, not on moto's pace beside a writer and two stream readers.
    let mut read_settings = env.read_settings(net, &table, settings.clone());
    read_settings.table_timeouts = AwsTimeouts {
        attempt: Duration::from_secs(10),
        operation: Duration::from_secs(30),
    };
    let inspect = InspectSettings {
        sample: SAMPLE,
        grace: GRACE,
        ..InspectSettings::default()
    };
    let inspector = |counts: Arc<Counts>| {
        let (read_settings, settings, inspect) =
            (read_settings.clone(), settings.clone(), inspect.clone());
        async move {
            let cache =
                RedisCache::from_settings(&read_settings.redis, &settings, &env.sdk).await?;
            let store = Counting::new(DynamoStore::from_settings(&read_settings, &env.sdk), counts);
            Ok::<_, Error>(Inspector::new(cache, store, settings, inspect))
        }
    };
    let monitor_counts = Arc::new(Counts::default());
    let sampler_counts = Arc::new(Counts::default());
    let sampler = inspector(sampler_counts.clone()).await?;
    let (handed_tx, mut handed) = tokio::sync::watch::channel(0u64);
    let monitoring = Monitoring {
        inspector: inspector(monitor_counts.clone()).await?,
        handed: handed_tx,
        checks: Mutex::default(),
    };

    // The stream's two readers: the invalidator's mapping as the template declares it, and the
    // monitor's as ChangeMonitorMapping does.
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/template.yaml");
    let mut esm = local_stack::esm_template::local(&template)?.config;
    esm.starting_position = StartingPosition::Latest;
    esm.on_failure = None;
    // The local stack's copy of ChangeMonitorMapping, polled every 250 ms as Lambda polls.
    let monitor_esm = EsmConfig {
        poll_interval: EsmConfig::default().poll_interval,
        ..local_stack::stack::change_monitor_esm()
    };
    assert_eq!(
        (monitor_esm.batch_size, monitor_esm.batching_window),
        (BATCH_SIZE, WINDOW),
        "the figure's window and batch size are the mapping's"
    );
    let reader = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&env.sdk), &stream_arn);
    let invalidating = Arc::new(Poller::new(reader.clone(), esm, Timed::new(invalidator)));
    let monitor = Arc::new(Poller::new(reader, monitor_esm, monitoring));
    let (inv_stats, mon_stats) = (invalidating.stats(), monitor.stats());
    let (stop_invalidating, invalidating_done) = in_background(&invalidating);
    let (stop_monitor, monitor_done) = in_background(&monitor);
    let writing = Arc::new(AtomicBool::new(true));
    let mut background = Background {
        writing: writing.clone(),
        tasks: vec![
            invalidating_done.abort_handle(),
            monitor_done.abort_handle(),
        ],
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while inv_stats.polls.load(Ordering::Relaxed) == 0
        || mon_stats.polls.load(Ordering::Relaxed) == 0
    {
        if Instant::now() > deadline {
            return Err("the stream's readers never read the stream".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // X: a product the writer leaves alone, so its one change is the planted race's.
    let x = ids.len() / 2;
    let x_id = ids[x].clone();
    let x_key = format!("{}{x_id}", settings.key_prefix);

    // The writer: a price change of a random other product every `monitor_change_every`.
    let writer = {
        let (dynamodb, table, ids, writing) = (
            env.dynamodb.clone(),
            table.clone(),
            ids.clone(),
            writing.clone(),
        );
        let every = sizes.monitor_change_every;
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(19);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut written, mut failed) = (0u64, 0u64);
            while writing.load(Ordering::Relaxed) {
                tick.tick().await;
                let i = loop {
                    let i = rng.usize(..ids.len());
                    if i != x {
                        break i;
                    }
                };
                let price = format!("{}.{:02}", rng.u32(10..500), rng.u32(1..100));
                match local_stack::seed::set_price(&dynamodb, &table, "productId", &ids[i], &price)
                    .await
                {
                    Ok(_) => written += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, "change-monitor write failed");
                        failed += 1;
                    }
                }
            }
            (written, failed)
        })
    };
    background.tasks.push(writer.abort_handle());
    let live_started = Instant::now();

    // X changes as the mapping hands the monitor its first batch (see the module doc).
    tokio::time::timeout(Duration::from_secs(40), handed.changed())
        .await
        .map_err(|_| "the monitor was never handed a batch")??;
    let old: Option<String> = control.get(&x_key).await?;
    let old = old.ok_or("X was not cached")?;
    local_stack::seed::set_price(&env.dynamodb, &table, "productId", &x_id, "7777.77").await?;
    let x_written = Instant::now();
    // The invalidator applies it ...
    loop {
        let now: Option<String> = control.get(&x_key).await?;
        if now.as_deref() != Some(old.as_str()) {
            break;
        }
        if x_written.elapsed() > Duration::from_secs(30) {
            return Err("the invalidator never applied X's change".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let x_applied = Instant::now();
    // ... and a fill that read the table before the change writes what it read.
    control.set_ex::<_, _, ()>(&x_key, &old, ttl).await?;
    let planted = Instant::now();

    // The random sampler, back to back, until the monitor has reported X.
    let monitoring = monitor.function();
    let mut sampling = Sampling::default();
    loop {
        let found = monitoring.found(&x_key).is_some();
        if (found && sampling.runs >= sizes.monitor_min_sample_runs) || planted.elapsed() > GIVE_UP
        {
            break;
        }
        let started = Instant::now();
        let report = sampler.run(Target::Sample(SAMPLE)).await?;
        sampling.runs += 1;
        sampling.took.push(stats::millis(started.elapsed()));
        sampling.keys_checked += report.checked();
        for row in report
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Inconsistent)
        {
            if row.key == x_key {
                sampling
                    .found
                    .get_or_insert((sampling.runs, planted.elapsed()));
            } else {
                sampling.other_inconsistent += 1;
            }
        }
    }

    // The writer stops; both readers get to the end of the stream.
    writing.store(false, Ordering::Relaxed);
    let (written, write_failures) = writer.await?;
    let changes = written + 1;
    let live_for = live_started.elapsed();
    let drained = Instant::now();
    while (inv_stats.records_acknowledged.load(Ordering::Relaxed) < changes
        || mon_stats.records_acknowledged.load(Ordering::Relaxed) < changes)
        && drained.elapsed() < Duration::from_secs(45)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_invalidating.send(());
    let _ = stop_monitor.send(());
    invalidating_done.await??;
    monitor_done.await??;
    drop(background);
    let live_reads = monitor_counts.now();
    let sampler_reads = sampler_counts.now();

    // A second pass of every batch with nothing else reaching Redis, for its accounting. The
    // records are old by now, so no check waits.
    let checks = std::mem::take(&mut *monitoring.checks.lock().unwrap());
    env.resetstat().await?;
    let mut quiet_rows = 0;
    for check in &checks {
        quiet_rows += monitoring
            .inspector
            .check_changes(&check.records)
            .await
            .rows
            .len();
    }
    let monitor_stats = env.commandstats().await?;
    let quiet_reads = monitor_counts.now().items() - live_reads.items();
    // The sampler alone the same way, for its cost per key.
    env.resetstat().await?;
    let quiet_sample = sampler.run(Target::Sample(SAMPLE)).await?;
    let sampler_stats = env.commandstats().await?;

    let _ = env.dynamodb.delete_table().table_name(&table).send().await;
    env.flushall().await?;

    // The live run's verdicts.
    let rows_judged: usize = checks.iter().map(|c| c.report.rows.len()).sum();
    let count =
        |f: fn(&ChangeVerdict) -> bool| -> usize { checks.iter().map(|c| c.report.count(f)).sum() };
    let consistent = count(|v| *v == ChangeVerdict::Consistent);
    let superseded = count(|v| *v == ChangeVerdict::Superseded);
    let pending = count(|v| matches!(v, ChangeVerdict::Pending(_)));
    let unchecked: usize = checks.iter().map(|c| c.report.unchecked).sum();
    let false_alarms: Vec<&str> = checks
        .iter()
        .flat_map(|c| c.report.inconsistent())
        .filter(|k| *k != x_key)
        .collect();
    let records_judged: usize = checks.iter().map(|c| c.records.len()).sum();
    let found = checks
        .iter()
        .position(|c| c.report.inconsistent().any(|k| k == x_key));

    // Every change's time from its record's stamp to the end of the check that judged it.
    let mut judged_after: Vec<f64> = checks
        .iter()
        .flat_map(|c| {
            c.records.iter().filter_map(|r| {
                let created = r
                    .pointer("/dynamodb/ApproximateCreationDateTime")?
                    .as_f64()?;
                Some((c.done_secs - created) * 1e3)
            })
        })
        .collect();
    judged_after.sort_by(f64::total_cmp);
    // One grace (the check a change may meet waiting), one run (a window, then its batch's
    // grace), each grace with the stamps' precision.
    let budget = (GRACE + STAMP_PRECISION) + (WINDOW + GRACE + STAMP_PRECISION) + ALLOWANCE;
    let within = judged_after
        .iter()
        .filter(|&&ms| ms <= stats::millis(budget))
        .count();

    let catalog = ids.len();
    let expected_runs = catalog as f64 / SAMPLE as f64;
    let expected_hours = expected_runs * SCHEDULE.as_secs_f64() / 3600.0;
    // The chance that `runs` samples of SAMPLE distinct keys include X.
    let chance = |runs: usize| 1.0 - (1.0 - SAMPLE as f64 / catalog as f64).powi(runs as i32);
    let sampler_found = match sampling.found {
        Some((run, after)) => format!(
            "found X in run {run} of {}, {:.1} s after the plant, a {:.1} % chance by then",
            sampling.runs,
            after.as_secs_f64(),
            chance(run) * 100.0
        ),
        None => format!("X not found in {} runs", sampling.runs),
    };
    let sampler_label = format!(
        "random sampling, {SAMPLE} keys a run back to back: {sampler_found} (expected: run \
         {expected_runs:.0} on average, {expected_hours:.1} h at the {}-minute schedule)",
        SCHEDULE.as_secs() / 60,
    );
    let sampler_text = format!(
        "the sampler: {} runs from the plant on ({:.0} ms median, {} keys checked, {} table \
         reads), {:.1} % chance of finding X in as many (1 - (1 - {SAMPLE}/{catalog})^{})",
        sampling.runs,
        stats::median(&sampling.took),
        sampling.keys_checked,
        sampler_reads.items(),
        chance(sampling.runs) * 100.0,
        sampling.runs,
    );
    let timeline = match found {
        Some(i) => {
            let c = &checks[i];
            let before = i.checked_sub(1).map(|j| &checks[j]);
            format!(
                "X's change written as the mapping handed the monitor batch 1 (the least favourable \
                 moment), applied by the invalidator {:.0} ms later and the stale document planted at \
                 once; {}X's batch (#{}, {} records) handed {:.1} s after the plant, reported {:.1} s \
                 after it",
                stats::millis(x_applied - x_written),
                match before {
                    Some(b) => format!(
                        "the batch before it held the shard until {:.1} s after the plant (its grace \
                         wait); ",
                        b.done.saturating_duration_since(planted).as_secs_f64()
                    ),
                    None => String::new(),
                },
                i + 1,
                c.records.len(),
                c.handed.saturating_duration_since(planted).as_secs_f64(),
                c.done.saturating_duration_since(planted).as_secs_f64(),
            )
        }
        None => format!(
            "X's change written as the mapping handed the monitor batch 1, applied {:.0} ms later; \
             not reported within {} s",
            stats::millis(x_applied - x_written),
            GIVE_UP.as_secs()
        ),
    };
    let all_changes = format!(
        "every change, stamp to the end of the check that judged it: p50 {:.1} s, p99 {:.1} s, \
         max {:.1} s, {within} of {} within the budget",
        percentile(&judged_after, 0.5) / 1e3,
        percentile(&judged_after, 0.99) / 1e3,
        percentile(&judged_after, 1.0) / 1e3,
        judged_after.len(),
    );
    let live_text = format!(
        "{catalog} products cached ({:.0} s seeding moto, {:.1} s caching; not timed); {changes} \
         changes in {:.0} s (1 every {} ms, {write_failures} writes failed), change to cache {}; \
         the monitor: {} batches, {records_judged} records, {rows_judged} changed keys judged",
        seeding.as_secs_f64(),
        caching.as_secs_f64(),
        live_for.as_secs_f64(),
        sizes.monitor_change_every.as_millis(),
        lag_summary(&invalidating.function().lags_ms()),
        checks.len(),
    );

    let monitor_commands = stats::top_level_calls(&monitor_stats, &Mix::default());
    let sampler_commands = stats::top_level_calls(&sampler_stats, &Mix::default());
    let by_name = |stats: &std::collections::BTreeMap<String, stats::CmdStat>, per: f64| {
        stats
            .iter()
            .filter(|(name, s)| {
                s.calls > 0 && !["info", "config"].contains(&name.split('|').next().unwrap_or(name))
            })
            .map(|(name, s)| format!("{name} {:.2}", s.calls as f64 / per))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let quiet_judged = quiet_rows.max(1) as f64;
    let sampled = quiet_sample.checked().max(1) as f64;

    let stream_failure = (mon_stats.records_acknowledged.load(Ordering::Relaxed) < changes
        || inv_stats.records_given_up.load(Ordering::Relaxed) > 0
        || mon_stats.records_given_up.load(Ordering::Relaxed) > 0)
        .then(|| {
            format!(
                "{changes} changes written, the invalidator acknowledged {} ({} given up), the \
                 monitor {} ({} given up)",
                inv_stats.records_acknowledged.load(Ordering::Relaxed),
                inv_stats.records_given_up.load(Ordering::Relaxed),
                mon_stats.records_acknowledged.load(Ordering::Relaxed),
                mon_stats.records_given_up.load(Ordering::Relaxed),
            )
        });

    Ok(vec![
        Row {
            figure: FIGURE,
            what: "stale entry reported, time from the plant".into(),
            net,
            judged_on: "wall",
            unit: Unit::Secs,
            measured: found.map_or(f64::NAN, |i| {
                checks[i]
                    .done
                    .saturating_duration_since(planted)
                    .as_secs_f64()
            }),
            baseline: sampling.found.map(|(_, after)| after.as_secs_f64()),
            baseline_label: sampler_label,
            budget: Budget::AtMost(budget.as_secs_f64()),
            note: format!(
                "budget: one grace plus one run, a run being a window of gathering and its \
                 batch's grace wait: a change made while a check waits (a shard has one batch at \
                 a time) waits that out first, so grace {g} s + 1 s, window {} s, grace {g} s + 1 s \
                 (moto stamps to the microsecond, so the monitor's extra second for DynamoDB's \
                 whole-second stamps is waited in full) + 1 s for the mapping's 250 ms poll and \
                 moto; {timeline}; {all_changes}; {sampler_text}; {live_text}",
                WINDOW.as_secs(),
                g = GRACE.as_secs(),
            ),
            failure: found
                .is_none()
                .then(|| "the monitor never reported X".into())
                .or(stream_failure),
        },
        Row {
            figure: FIGURE,
            what: "Redis commands per change judged".into(),
            net,
            judged_on: "INFO commandstats, quiet pass",
            unit: Unit::Mean,
            measured: monitor_commands / quiet_judged,
            baseline: Some(sampler_commands / sampled),
            baseline_label: format!(
                "random sampling, per key checked ({})",
                by_name(&sampler_stats, sampled)
            ),
            budget: Budget::AtMost(2.0),
            note: format!(
                "{} (top-level) over a second pass of the monitor's {} batches ({quiet_rows} \
                 changed keys, {quiet_reads} table reads) made after the stream, the invalidator, \
                 the writer and the sampler had stopped, so no other client's command is counted \
                 (Redis 7.0 counts commands per server, not per client or user); the sampler \
                 alone the same way, one run of {} keys",
                by_name(&monitor_stats, quiet_judged),
                checks.len(),
                quiet_sample.checked(),
            ),
            failure: None,
        },
        Row {
            figure: FIGURE,
            what: "DynamoDB reads per change judged".into(),
            net,
            judged_on: "counted around its store",
            unit: Unit::Mean,
            measured: live_reads.items() as f64 / rows_judged.max(1) as f64,
            baseline: Some(sampler_reads.items() as f64 / sampling.keys_checked.max(1) as f64),
            baseline_label: "random sampling, per key checked".into(),
            budget: Budget::AtMost(0.01),
            note: format!(
                "the live run: items read {} ({} GetItems, {} BatchGetItems) for {rows_judged} \
                 changed keys judged (X's among them, the one that differed): {consistent} \
                 consistent, {superseded} superseded, {pending} pending, {} inconsistent, \
                 {unchecked} unchecked; strongly consistent reads, paid only where the cache \
                 differs from the change's new image",
                live_reads.items(),
                live_reads.gets,
                live_reads.batches,
                false_alarms.len() + usize::from(found.is_some()),
            ),
            failure: (unchecked > 0).then(|| format!("{unchecked} changes unchecked")),
        },
        Row {
            figure: FIGURE,
            what: "false alarms (inconsistent besides X)".into(),
            net,
            judged_on: "monitor's verdicts",
            unit: Unit::Count,
            measured: false_alarms.len() as f64,
            baseline: None,
            baseline_label: format!("{rows_judged} changed keys judged"),
            budget: Budget::AtMost(0.0),
            note: format!(
                "{}; the sampler reported {} keys besides X inconsistent",
                match false_alarms.first() {
                    Some(k) => format!("e.g. {k}"),
                    None => "only X".into(),
                },
                sampling.other_inconsistent
            ),
            failure: None,
        },
    ])
}
