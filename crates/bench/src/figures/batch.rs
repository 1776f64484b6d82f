//! The invalidator's batches: a 10,000-record mix in delete mode (wall and Redis CPU), and
//! refresh mode with large documents, against plain pipelines of `DEL`s and `SET`s.

use product_cache::config::{CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings};
use product_cache::document::Document;
use product_cache::invalidate::Invalidator;
use serde_json::Value;

use crate::compare::{alternate, timed, Compare, Cost, Order, Samples, ThroughProxy, PRODUCT};
use crate::env::Env;
use crate::records::{self, image, item_of};
use crate::report::{Budget, Net, Row, Unit};
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

/// `work`, timed (round trips through the proxy), with the Redis server's CPU time it took.
async fn measured<F: std::future::Future>(
    env: &Env,
    work: F,
) -> Result<(F::Output, Cost, f64), Error> {
    let cpu = env.cpu_seconds().await?;
    let (out, cost) = timed(env, work).await;
    let cpu_secs = env.cpu_seconds().await? - cpu;
    Ok((out, cost, cpu_secs))
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

    let mut cpu_secs = [0.0, 0.0];
    let mut failed = 0;
    let mut commands = String::new();
    let mut mix = String::new();
    // The product's batch, for the baseline's turn in the same round.
    let (mut ids, mut keys) = (Vec::new(), Vec::new());
    let [product, baseline] =
        alternate(sizes.batch_reps, [1, 1], Order::Fixed, async |side, rep| {
            let (cost, cpu) = if side == PRODUCT {
                // Fresh sequence numbers every time; the same shape (seeded) every run.
                let event;
                (ids, event) = records::mixed_batch(sizes.batch_records, sizes.batch_keys, 42);
                if rep == 0 {
                    mix = records::event_names(&event);
                }
                keys = keys_of(&event);

                warm_cache(env, &ids).await?;
                env.resetstat().await?;
                let info_before = env.info_calls();
                let (response, cost, cpu) = measured(env, inv.handle(event)).await?;
                failed += response.batch_item_failures.len();
                if rep == 0 {
                    commands = commands_since_reset(env, env.info_calls() - info_before).await?;
                }
                (cost, cpu)
            } else {
                warm_cache(env, &ids).await?;
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                let (result, cost, cpu) = measured(env, pipe.query_async::<()>(&mut conn)).await?;
                result?;
                (cost, cpu)
            };
            cpu_secs[side] += cpu;
            Ok(cost)
        })
        .await?
        .map(Samples::from);
    let [product_cpu, baseline_cpu] = cpu_secs;

    // One command per record, once: it is the slow one.
    let (ids, event) = records::mixed_batch(sizes.batch_records, sizes.batch_keys, 42);
    warm_cache(env, &ids).await?;
    let keys = keys_of(&event);
    let (result, one_by_one, _) = measured(env, async {
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

    let mut sequential = Samples::default();
    sequential.push(one_by_one);
    let cpu_per_record = |cpu: f64| cpu * 1e6 / (product.len() * sizes.batch_records) as f64;
    let failure = (failed > 0).then(|| format!("the batch reported {failed} failures"));
    let records = sizes.batch_records;
    let reps = sizes.batch_reps;
    let base_note = format!("{records} records ({mix}), median of {reps}");
    let compare = |what: String, baseline_label: String, budget, note: String| Compare {
        figure: "batch",
        what,
        baseline_label,
        budget,
        unit: Unit::Millis,
        p: 0.5,
        through_proxy: ThroughProxy::RoundTrips,
        note,
        failure: failure.clone(),
    };
    Ok(vec![
        compare(
            format!(
                "{records}-record batch, {}",
                match net {
                    Net::Loopback => "wall",
                    Net::Proxy => "round trips",
                }
            ),
            format!("one pipeline of {records} DELs"),
            // Wall time on loopback; through the proxy, round trips: the positions read, then
            // the deletes written.
            Budget::RatioAtMost(2.0),
            match net {
                Net::Loopback => {
                    format!("{base_note}; Redis ran (scripts' commands included): {commands}")
                }
                Net::Proxy => base_note.clone(),
            },
        )
        .row(net, &product, &baseline),
        compare(
            format!("{records}-record batch vs one command per record"),
            format!("{records} sequential DELs"),
            Budget::FasterAtLeast(10.0),
            match net {
                Net::Loopback => base_note.clone(),
                Net::Proxy => String::new(),
            },
        )
        .row(net, &product, &sequential),
        Row {
            figure: "batch",
            what: "Redis server CPU per record".into(),
            net,
            judged_on: "INFO cpu (sys+user)",
            unit: Unit::Micros,
            measured: cpu_per_record(product_cpu),
            baseline: Some(cpu_per_record(baseline_cpu)),
            baseline_label: "one pipelined DEL".into(),
            budget: Budget::RatioAtMost(4.0),
            note: format!("CPU us per record over {reps} batches"),
            failure,
        },
    ])
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

    let mut failed = 0;
    let mut written = true;
    let mut commands = String::new();
    let [product, baseline] = alternate(
        sizes.refresh_reps,
        [1, 1],
        Order::Fixed,
        async |side, rep| {
            if side != PRODUCT {
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
                let (result, cost) = timed(env, pipe.query_async::<()>(&mut conn)).await;
                result?;
                return Ok(cost);
            }
            let event = make_event(2);
            env.flushall().await?;
            inv.cache().declare_empty().await?;
            env.resetstat().await?;
            let info_before = env.info_calls();
            let (response, cost) = timed(env, inv.handle(event)).await;
            failed += response.batch_item_failures.len();
            if rep == 0 {
                commands = commands_since_reset(env, env.info_calls() - info_before).await?;
                let cached: Option<String> = redis::cmd("GET")
                    .arg(format!("product:{}", ids[0]))
                    .query_async(&mut env.control())
                    .await?;
                written = cached.as_deref() == Some(docs[0].as_str());
            }
            Ok(cost)
        },
    )
    .await?
    .map(Samples::from);
    let mut failure = (failed > 0).then(|| format!("the batch reported {failed} failures"));
    if !written {
        failure = Some("the refresh did not leave the new document in Redis".into());
    }
    let note = format!(
        "{n} records, {:.1} KB each, median of {}; Redis ran (scripts' commands included): {commands}",
        bytes as f64 / n as f64 / 1024.0,
        sizes.refresh_reps
    );
    Ok(vec![Compare {
        figure: "refresh",
        what: format!("refresh mode, {n} records of ~5 KB"),
        baseline_label: format!("one pipeline of {n} SETs"),
        budget: Budget::RatioAtMost(2.5),
        unit: Unit::Millis,
        p: 0.5,
        through_proxy: ThroughProxy::RoundTrips,
        note,
        failure,
    }
    .row(net, &product, &baseline)])
}
