//! The invalidator's batches: a 10,000-record mix in delete mode (wall and Redis CPU), and
//! refresh mode with large documents, against plain pipelines of `DEL`s and `SET`s.

use std::time::{Duration, Instant};

use product_cache::config::{CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings};
use product_cache::document::Document;
use product_cache::invalidate::Invalidator;
use serde_json::Value;

use crate::env::Env;
use crate::records::{self, image, item_of};
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, median};
use crate::{Error, Sizes};

async fn invalidator(
    env: &Env,
    net: Net,
    mode: InvalidationMode,
) -> Result<Invalidator<product_cache::cache::RedisCache>, Error> {
    let settings = InvalidatorSettings {
        redis: RedisSettings::new(env.url(net)),
        mode,
        cache: CacheSettings::default(),
    };
    let invalidator = Invalidator::build(settings, &env.sdk).await?;
    // A long-running deployment's slots have had their epochs for long: refreshes write.
    invalidator.cache().declare_empty().await?;
    Ok(invalidator)
}

fn keys_of(event: &Value) -> Vec<String> {
    event["Records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let id = r["dynamodb"]["Keys"]["productId"]["S"]
                .as_str()
                .unwrap_or("");
            format!("product:{id}")
        })
        .collect()
}

/// Empties Redis and caches a document under each key, as a warm cache would hold them.
async fn warm_cache(env: &Env, ids: &[String]) -> Result<(), Error> {
    env.flushall().await?;
    let mut pipe = redis::pipe();
    for id in ids {
        let doc = Document::from_item(&item_of(&image(id, "9.99", 0, 0)))?;
        pipe.cmd("SET")
            .arg(format!("product:{id}"))
            .arg(doc.as_str())
            .arg("EX")
            .arg(3600)
            .ignore();
    }
    pipe.query_async::<()>(&mut env.control()).await?;
    Ok(())
}

/// What one timed run cost.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    wall: Duration,
    round_trips: u64,
    cpu_secs: f64,
}

async fn measured<F: std::future::Future>(env: &Env, work: F) -> Result<(F::Output, Cost), Error> {
    let cpu = env.cpu_seconds().await?;
    env.reset_proxy();
    let started = Instant::now();
    let out = work.await;
    let wall = started.elapsed();
    let round_trips = env.round_trips();
    let cpu_secs = env.cpu_seconds().await? - cpu;
    Ok((
        out,
        Cost {
            wall,
            round_trips,
            cpu_secs,
        },
    ))
}

/// The commands Redis ran since `CONFIG RESETSTAT`, from `INFO commandstats` (script-run
/// ones included), less the benchmark's own: `own_info` is how many `INFO`s it sent since.
async fn commands_since_reset(env: &Env, own_info: u64) -> Result<String, Error> {
    let stats = env.commandstats().await?;
    Ok(stats
        .iter()
        .filter(|(name, _)| !name.starts_with("config"))
        .filter_map(|(name, s)| {
            let calls = if name == "info" {
                s.calls.saturating_sub(own_info)
            } else {
                s.calls
            };
            (calls > 0).then(|| format!("{name} {calls}"))
        })
        .collect::<Vec<_>>()
        .join(", "))
}

/// A 10,000-record INSERT/MODIFY/REMOVE mix over 5,000 keys in delete mode: wall time (round
/// trips through the proxy) against one pipeline of `DEL`s and against one command per record,
/// and Redis's CPU per record against the pipelined `DEL`s.
pub async fn mixed(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    let inv = invalidator(env, net, InvalidationMode::Delete).await?;
    let mut conn = env.raw_conn(net).await?;
    // Connects and loads the script.
    let (ids, warm_up) = records::mixed_batch(100, 50, 1);
    warm_cache(env, &ids).await?;
    inv.handle(warm_up).await;

    let (mut product, mut baseline) = (Vec::new(), Vec::new());
    let mut failed = 0;
    let mut commands = String::new();
    let mut mix = String::new();
    for rep in 0..sizes.batch_reps {
        // Fresh sequence numbers every time; the same shape (seeded) every run.
        let (ids, event) = records::mixed_batch(sizes.batch_records, sizes.batch_keys, 42);
        if rep == 0 {
            mix = records::event_names(&event);
        }
        let keys = keys_of(&event);

        warm_cache(env, &ids).await?;
        env.resetstat().await?;
        let info_before = env.info_calls();
        let (response, cost) = measured(env, inv.handle(event)).await?;
        failed += response.batch_item_failures.len();
        if rep == 0 {
            commands = commands_since_reset(env, env.info_calls() - info_before).await?;
        }
        product.push(cost);

        warm_cache(env, &ids).await?;
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("DEL").arg(key).ignore();
        }
        let (result, cost) = measured(env, pipe.query_async::<()>(&mut conn)).await?;
        result?;
        baseline.push(cost);
    }

    // One command per record, once: it is the slow one.
    let (ids, event) = records::mixed_batch(sizes.batch_records, sizes.batch_keys, 42);
    warm_cache(env, &ids).await?;
    let keys = keys_of(&event);
    let (result, one_by_one) = measured(env, async {
        for key in &keys {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok::<(), redis::RedisError>(())
    })
    .await?;
    result?;

    let wall = |costs: &[Cost]| {
        median(
            &costs
                .iter()
                .map(|c| stats::millis(c.wall))
                .collect::<Vec<_>>(),
        )
    };
    let trips = |costs: &[Cost]| {
        median(
            &costs
                .iter()
                .map(|c| c.round_trips as f64)
                .collect::<Vec<_>>(),
        )
    };
    let cpu_per_record = |costs: &[Cost]| {
        costs.iter().map(|c| c.cpu_secs).sum::<f64>() * 1e6
            / (costs.len() * sizes.batch_records) as f64
    };
    let failure = (failed > 0).then(|| format!("the batch reported {failed} failures"));
    let records = sizes.batch_records;
    let reps = sizes.batch_reps;
    let base_note = format!("{records} records ({mix}), median of {reps}");
    let rows = match net {
        Net::Loopback => vec![
            Row {
                figure: "batch",
                what: format!("{records}-record batch, wall"),
                net,
                judged_on: "wall",
                unit: Unit::Millis,
                measured: wall(&product),
                baseline: Some(wall(&baseline)),
                baseline_label: format!("one pipeline of {records} DELs"),
                budget: Budget::RatioAtMost(3.0),
                note: format!("{base_note}; Redis ran (scripts' commands included): {commands}"),
                failure: failure.clone(),
            },
            Row {
                figure: "batch",
                what: format!("{records}-record batch vs one command per record"),
                net,
                judged_on: "wall",
                unit: Unit::Millis,
                measured: wall(&product),
                baseline: Some(stats::millis(one_by_one.wall)),
                baseline_label: format!("{records} sequential DELs"),
                budget: Budget::FasterAtLeast(10.0),
                note: base_note.clone(),
                failure: failure.clone(),
            },
        ],
        Net::Proxy => vec![
            Row {
                figure: "batch",
                what: format!("{records}-record batch, round trips"),
                net,
                judged_on: "round trips",
                unit: Unit::RoundTrips,
                measured: trips(&product),
                baseline: Some(trips(&baseline)),
                baseline_label: format!("one pipeline of {records} DELs"),
                budget: Budget::RatioAtMost(3.0),
                note: format!(
                    "{base_note}; wall {:.1} ms vs {:.1} ms",
                    wall(&product),
                    wall(&baseline)
                ),
                failure: failure.clone(),
            },
            Row {
                figure: "batch",
                what: format!("{records}-record batch vs one command per record"),
                net,
                judged_on: "round trips",
                unit: Unit::RoundTrips,
                measured: trips(&product),
                baseline: Some(one_by_one.round_trips as f64),
                baseline_label: format!("{records} sequential DELs"),
                budget: Budget::FasterAtLeast(10.0),
                note: format!(
                    "wall {:.1} ms vs {:.0} ms",
                    wall(&product),
                    stats::millis(one_by_one.wall)
                ),
                failure: failure.clone(),
            },
        ],
    };
    let mut rows = rows;
    rows.push(Row {
        figure: "batch",
        what: "Redis server CPU per record".into(),
        net,
        judged_on: "INFO cpu (sys+user)",
        unit: Unit::Micros,
        measured: cpu_per_record(&product),
        baseline: Some(cpu_per_record(&baseline)),
        baseline_label: "one pipelined DEL".into(),
        budget: Budget::RatioAtMost(4.0),
        note: format!("CPU us per record over {reps} batches"),
        failure,
    });
    Ok(rows)
}

/// Refresh mode: 1,000 records carrying ~5 KB items (a `NEW_IMAGE` stream, so a record is
/// about its item) against one pipeline of `SET`s of the same documents.
pub async fn refresh(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    let inv = invalidator(env, net, InvalidationMode::Refresh).await?;
    let mut conn = env.raw_conn(net).await?;
    let n = sizes.refresh_records;
    let ids: Vec<String> = (0..n).map(|i| format!("bench-r-{i:05}")).collect();
    let make_event = |version: u64| {
        let records: Vec<Value> = ids
            .iter()
            .map(|id| {
                let new = image(id, "19.99", version, sizes.refresh_bytes);
                records::record("MODIFY", id, Some(new), None, "NEW_IMAGE")
            })
            .collect();
        records::event(records)
    };
    let docs: Vec<String> = ids
        .iter()
        .map(|id| {
            Document::from_item(&item_of(&image(id, "19.99", 2, sizes.refresh_bytes)))
                .map(Document::into_string)
        })
        .collect::<Result<_, _>>()?;
    let bytes = serde_json::to_string(&make_event(1))?.len();

    // Each run starts from an empty Redis, declared so: a FLUSHALL is otherwise a data loss,
    // after which refreshes delete until the slots' new epochs are older than the records.
    env.flushall().await?;
    inv.cache().declare_empty().await?;
    inv.handle(make_event(1)).await;

    let (mut product, mut baseline) = (Vec::new(), Vec::new());
    let mut failed = 0;
    let mut written = true;
    let mut commands = String::new();
    for rep in 0..sizes.refresh_reps {
        let event = make_event(2);
        env.flushall().await?;
        inv.cache().declare_empty().await?;
        env.resetstat().await?;
        let info_before = env.info_calls();
        let (response, cost) = measured(env, inv.handle(event)).await?;
        failed += response.batch_item_failures.len();
        product.push(cost);
        if rep == 0 {
            commands = commands_since_reset(env, env.info_calls() - info_before).await?;
            let cached: Option<String> = redis::cmd("GET")
                .arg(format!("product:{}", ids[0]))
                .query_async(&mut env.control())
                .await?;
            written = cached.as_deref() == Some(docs[0].as_str());
        }

        env.flushall().await?;
        let mut pipe = redis::pipe();
        for (id, doc) in ids.iter().zip(&docs) {
            pipe.cmd("SET")
                .arg(format!("product:{id}"))
                .arg(doc)
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        let (result, cost) = measured(env, pipe.query_async::<()>(&mut conn)).await?;
        result?;
        baseline.push(cost);
    }
    let wall = |costs: &[Cost]| {
        median(
            &costs
                .iter()
                .map(|c| stats::millis(c.wall))
                .collect::<Vec<_>>(),
        )
    };
    let trips = |costs: &[Cost]| {
        median(
            &costs
                .iter()
                .map(|c| c.round_trips as f64)
                .collect::<Vec<_>>(),
        )
    };
    let mut failure = (failed > 0).then(|| format!("the batch reported {failed} failures"));
    if !written {
        failure = Some("the refresh did not leave the new document in Redis".into());
    }
    let note = format!(
        "{n} records, {:.1} KB each, median of {}; Redis ran (scripts' commands included): {commands}",
        bytes as f64 / n as f64 / 1024.0,
        sizes.refresh_reps
    );
    Ok(vec![match net {
        Net::Loopback => Row {
            figure: "refresh",
            what: format!("refresh mode, {n} records of ~5 KB"),
            net,
            judged_on: "wall",
            unit: Unit::Millis,
            measured: wall(&product),
            baseline: Some(wall(&baseline)),
            baseline_label: format!("one pipeline of {n} SETs"),
            budget: Budget::RatioAtMost(3.0),
            note,
            failure,
        },
        Net::Proxy => Row {
            figure: "refresh",
            what: format!("refresh mode, {n} records of ~5 KB"),
            net,
            judged_on: "round trips",
            unit: Unit::RoundTrips,
            measured: trips(&product),
            baseline: Some(trips(&baseline)),
            baseline_label: format!("one pipeline of {n} SETs"),
            budget: Budget::RatioAtMost(3.0),
            note: format!(
                "{note}; wall {:.1} ms vs {:.1} ms",
                wall(&product),
                wall(&baseline)
            ),
            failure,
        },
    }])
}
