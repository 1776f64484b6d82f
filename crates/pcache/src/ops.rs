//! The operator commands for the day something goes wrong: `inspect` (the cache and the table
//! side by side), `purge` (delete cached copies the safe way) and `redrive` (apply again what the
//! invalidator gave up on). Each works on the local stack and on real AWS (see `place`), says
//! which system it touched, and has a dry run where it changes anything.

use std::path::Path;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use local_stack::stream::StreamReader;
use pcache::changes::{self, Range, Tick};
use pcache::redrive::{self, Destination, FailedBatch, Outcome};
use product_cache::config::InvalidatorSettings;
use product_cache::id::ProductId;
use product_cache::inspect::{InspectSettings, Inspector, Target as Inspect, Verdict};
use product_cache::invalidate::Invalidator;

use crate::cli::{InspectArgs, PurgeArgs, RedriveArgs};
use crate::commands::Error;

fn bar(len: usize, what: &str) -> ProgressBar {
    let template = format!("{what} {{bar:40}} {{pos}}/{{len}} ({{per_sec}})");
    ProgressBar::new(len as u64)
        .with_style(ProgressStyle::with_template(&template).expect("a valid template"))
}

/// Prints each key's verdict, both sides where they differ; fails if anything inconsistent
/// was left in place.
pub async fn inspect(args: InspectArgs) -> Result<(), Error> {
    if args.changes {
        return inspect_changes(args).await;
    }
    let place = args.target.place().await?;
    eprintln!("pcache: inspecting {}", place.description);
    let settings = InspectSettings {
        sample: args.sample,
        grace: Duration::from_millis(args.grace_ms),
        repair: args.repair,
        ..InspectSettings::default()
    };
    let inspector = Inspector::build(place.read_settings(), settings, &place.sdk).await?;
    let target = if args.ids.is_empty() {
        Inspect::Sample(args.sample)
    } else {
        Inspect::Ids(args.ids)
    };
    let report = inspector.run(target).await?;
    for row in &report.rows {
        let side = |v: &Option<String>| v.clone().unwrap_or_else(|| "(nothing)".into());
        println!(
            "{:<14} {}  position {}  table version {}",
            row.verdict.as_str(),
            row.key,
            row.cached_position.as_deref().unwrap_or("-"),
            row.table_version.as_deref().unwrap_or("-"),
        );
        if matches!(row.verdict, Verdict::Inconsistent | Verdict::Settled) {
            println!("    cache: {}", side(&row.cached));
            println!("    table: {}", side(&row.table));
        }
    }
    let inconsistent = report.count(Verdict::Inconsistent);
    println!(
        "{} keys checked: {} consistent, {} inconsistent, {} settled within {} ms, {} not cached; {} repaired",
        report.checked(),
        report.count(Verdict::Consistent),
        inconsistent,
        report.count(Verdict::Settled),
        args.grace_ms,
        report.count(Verdict::NotCached),
        report.repaired,
    );
    if inconsistent > report.repaired {
        return Err(format!(
            "{inconsistent} keys differ from the table (purge them with --repair or pcache purge)"
        )
        .into());
    }
    Ok(())
}

/// `inspect --changes`: the change monitor over a range of the stream (see `pcache::changes`).
/// Prints a summary; fails, as a sample's inspection does, if anything inconsistent was left in
/// place, and if some of the range could not be read or judged.
async fn inspect_changes(args: InspectArgs) -> Result<(), Error> {
    let range = Range::new(args.since, args.until, SystemTime::now())?;
    let place = args.target.place().await?;
    // The inspector function's variables (INVALIDATOR_PARALLELIZATION_FACTOR tells whether a
    // shard's order shows the invalidator's progress), the command line's options over them.
    let settings = InspectSettings {
        grace: Duration::from_millis(args.grace_ms),
        repair: args.repair,
        change_share: args.share,
        ..InspectSettings::from_source(&product_cache::config::Env)?
    };
    let inspector = Inspector::build(place.read_settings(), settings, &place.sdk).await?;
    let arn = changes::stream_arn(&aws_sdk_dynamodb::Client::new(&place.sdk), &place.table).await?;
    let reader = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&place.sdk), arn);
    eprintln!(
        "pcache: checking the changes of {range} in {}",
        place.description
    );
    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("reading the stream {bar:40} {pos}/{len} shards, {msg}")
            .expect("a valid template"),
    );
    let records = std::cell::Cell::new(0);
    let check = changes::check(
        &inspector,
        &reader,
        range,
        args.share,
        args.max_empty_pages,
        |tick| match tick {
            Tick::Shards(n) => progress.set_length(n as u64),
            Tick::Records(n) => {
                records.set(records.get() + n);
                progress.set_message(format!("{} records", records.get()));
            }
            Tick::ShardDone => progress.inc(1),
        },
    )
    .await?;
    progress.finish_and_clear();
    println!("{check}");
    let mut failed = Vec::new();
    let left = check.inconsistent.len().saturating_sub(check.repaired);
    if left > 0 {
        failed.push(format!(
            "{left} changed keys are inconsistent (purge them with --repair or pcache purge)"
        ));
    }
    let short = check.shards.iter().filter(|(_, r)| r.is_short()).count();
    if short > 0 {
        failed.push(format!("{short} shards were not read to the range's end"));
    }
    if check.unchecked > 0 {
        failed.push(format!("{} changes could not be judged", check.unchecked));
    }
    if !failed.is_empty() {
        return Err(format!("{} (see above)", failed.join("; ")).into());
    }
    Ok(())
}

/// Deletes the ids' keys with their leases, in pipelined chunks.
pub async fn purge(args: PurgeArgs) -> Result<(), Error> {
    let place = args.target.place().await?;
    let mut ids = args.ids;
    if let Some(path) = &args.from_file {
        ids.extend(ids_from(path)?);
    }
    let keys = ids
        .iter()
        .map(|id| {
            ProductId::parse(id, place.settings.key_type)
                .map(|id| id.cache_key(&place.settings.key_prefix))
                .map_err(|e| format!("{id:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cache =
        product_cache::cache::RedisCache::from_settings(&place.redis, &place.settings, &place.sdk)
            .await?;
    let verb = if args.dry_run {
        "would purge"
    } else {
        "purging"
    };
    eprintln!(
        "pcache: {verb} {} keys in {}",
        keys.len(),
        place.description
    );
    let progress = bar(keys.len(), "purging");
    let mut held = 0;
    for chunk in keys.chunks(1000) {
        held += if args.dry_run {
            let values = cache.values(chunk).await?;
            for (key, (value, _)) in chunk.iter().zip(&values) {
                if value.is_some() {
                    println!("would purge {key}");
                }
            }
            values.iter().filter(|(v, _)| v.is_some()).count()
        } else {
            cache.purge(chunk).await?
        };
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if args.dry_run {
        println!(
            "dry run: {held} of {} keys hold a value; nothing deleted",
            keys.len()
        );
    } else {
        println!("purged {} keys ({held} held a value)", keys.len());
    }
    Ok(())
}

fn ids_from(path: &Path) -> Result<Vec<String>, Error> {
    Ok(
        pcache::warm::ids_from_file(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?,
    )
}

/// Applies each failed batch again (see `pcache::redrive`), then removes the records that
/// were dealt with from their destination.
pub async fn redrive(args: RedriveArgs) -> Result<(), Error> {
    let place = args.target.place().await?;
    let destination = match (&args.queue_url, &args.from_file) {
        (Some(url), _) => Destination::Sqs {
            client: aws_sdk_sqs::Client::new(&place.sdk),
            queue_url: url.clone(),
            wait_seconds: args.wait_seconds,
        },
        (None, Some(path)) => Destination::File(path.clone()),
        (None, None) => Destination::File(args.target.state_dir.join("on-failure.jsonl")),
    };
    // The invalidator function's own settings (REDIS_CONFIRM_REPLICAS and the rest come with
    // `place.redis`), so a redriven batch is acknowledged by the same rule as the function's.
    let invalidator = Invalidator::build(
        InvalidatorSettings {
            redis: place.redis.clone(),
            mode: args.mode,
            cache: place.settings.clone(),
        },
        &place.sdk,
    )
    .await?;
    // A one-shot process: wait for the cache's connections before the first batch, or its
    // budget would go on forming them.
    if let Err(e) = invalidator.cache().ready(place.redis.connect_timeout).await {
        eprintln!("pcache: the cache is not reachable yet ({e}); batches may fail and be kept");
    }
    let streams = aws_sdk_dynamodbstreams::Client::new(&place.sdk);
    let messages = destination.take().await?;
    eprintln!(
        "pcache: {} failed batches to redrive{} in {}",
        messages.len(),
        if args.dry_run { " (dry run)" } else { "" },
        place.description
    );
    let progress = bar(messages.len(), "redriving");
    let mut done = Vec::with_capacity(messages.len());
    let mut left = 0;
    for message in &messages {
        let outcome = match FailedBatch::parse(&message.record) {
            Ok(batch) => {
                let reader = redrive::reader_for(&streams, &batch);
                let outcome = redrive::redrive(
                    &batch,
                    &reader,
                    &invalidator,
                    args.max_empty_pages,
                    args.dry_run,
                )
                .await;
                progress.suspend(|| {
                    println!(
                        "{} {}..{}: {outcome}",
                        batch.shard_id, batch.start, batch.end
                    )
                });
                outcome
            }
            Err(e) => {
                progress.suspend(|| println!("skipped a record: {e}"));
                Outcome::Failed { why: e.to_string() }
            }
        };
        if matches!(
            outcome,
            Outcome::Failed { .. } | Outcome::Unrecoverable { .. }
        ) {
            left += 1;
        }
        done.push(!args.dry_run && outcome.is_done());
        progress.inc(1);
    }
    progress.finish_and_clear();
    let settled = destination.settle(&messages, &done).await;
    for e in &settled.errors {
        println!(
            "not settled, stays for the next redrive: {}",
            local_stack::error::chain(e)
        );
    }
    println!(
        "{} of {} failed batches redriven and removed from the destination",
        settled.removed,
        messages.len()
    );
    let mut failed = Vec::new();
    if left > 0 {
        failed.push(format!("{left} failed batches could not be redriven"));
    }
    if !settled.errors.is_empty() {
        failed.push(format!(
            "{} records could not be settled at the destination",
            settled.errors.len()
        ));
    }
    if !failed.is_empty() {
        return Err(format!("{} (see above)", failed.join("; ")).into());
    }
    Ok(())
}
