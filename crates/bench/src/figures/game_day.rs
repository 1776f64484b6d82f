//! Issue 17's game day as a benchmark figure: 3 primaries with a replica each, every function
//! connected as the least-privilege user (`product_cache::acl::rules`), the invalidator on the
//! table's real stream through the event source mapping the SAM template declares
//! (`REDIS_CONFIRM_REPLICAS=1`), a writer changing prices throughout. In sequence:
//!
//! 1. healthy, 10 s;
//! 2. a primary killed and left down for 60 s: its shard is served by the promoted replica
//!    alone. Judged: the invalidation lag (change to cache) p99 of this stretch against the
//!    healthy one's;
//! 3. the node back as a replica, in sync; a few healthy seconds;
//! 4. another primary stalled (SIGSTOP) for 10 s, which the cluster fails over meanwhile.
//!    Judged: reads of that shard's products once the readers' breaker has opened, against the
//!    same reads with Redis unreachable by configuration (alternating); and the time from the
//!    shard's recovery (its replica promoted) to hits again.
//!
//! Loopback only: the cluster with replicas has no delaying proxies, and the figure is about
//! what the faults cost, not the network.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use local_stack::poller::{Poller, StartingPosition};
use local_stack::services::RedisCluster;
use local_stack::stream::StreamReader;
use product_cache::config::{
    CacheSettings, InvalidationMode, InvalidatorSettings, ReadSettings, RedisSettings,
};
use product_cache::invalidate::Invalidator;
use product_cache::read::{CacheStatus, ReadPath};

use super::degraded::bypass_latency;
use super::flash_sale::{in_background, Timed};
use crate::compare::{Cost, Samples};
use crate::env::Env;
use crate::records::now_secs;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, percentile};
use crate::{Error, Sizes};

const USER: &str = "product-cache";
const PASSWORD: &str = "bench-least-privilege";

pub async fn run(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    if net == Net::Proxy {
        return Ok(Vec::new());
    }
    let settings = CacheSettings {
        version_attribute: Some("version".into()),
        ..CacheSettings::default()
    };
    let rules = product_cache::acl::rules(&settings.key_prefix);
    let password = format!(">{PASSWORD}");
    let mut user = vec!["--user", USER, "on", &password];
    user.extend(rules.split_whitespace());
    let mut cluster = RedisCluster::start_with_replicas_and(3, 1, &user).await?;
    let entry = cluster.ports()[0];
    let url = format!("redis://{USER}:{PASSWORD}@127.0.0.1:{entry}");
    let redis = RedisSettings {
        cluster: true,
        confirm_replicas: 1,
        ..RedisSettings::new(&url)
    };

    // A table of its own, with its stream.
    let table = format!("bench-game-day-{}", std::process::id());
    let stream_arn = local_stack::table::ensure_table(
        &env.dynamodb,
        &table,
        "productId",
        product_cache::id::KeyType::S,
    )
    .await?;
    let products = local_stack::seed::catalog(sizes.game_day_products);
    let items = products.iter().map(|p| p.item("productId")).collect();
    local_stack::seed::batch_write(&env.dynamodb, &table, items).await?;
    let ids: Vec<String> = products.into_iter().map(|p| p.id).collect();

    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/template.yaml");
    let mut esm = local_stack::esm_template::local(&template)?.config;
    esm.starting_position = StartingPosition::Latest;
    esm.on_failure = None;
    let invalidator = Invalidator::build(
        InvalidatorSettings {
            redis: redis.clone(),
            mode: InvalidationMode::Refresh,
            cache: settings.clone(),
        },
        &env.sdk,
    )
    .await?;
    let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&env.sdk), &stream_arn);
    let poller = Arc::new(Poller::new(stream, esm, Timed::new(invalidator)));
    let poller_stats = poller.stats();
    let (stop_polling, polling) = in_background(&poller);

    let read = ReadPath::build(
        ReadSettings::new(redis.clone(), &table, settings.clone()),
        &env.sdk,
    )
    .await?;
    let closed = local_stack::services::free_port();
    let unreachable = ReadPath::build(
        ReadSettings::new(
            RedisSettings::new(format!("redis://127.0.0.1:{closed}")),
            &table,
            settings.clone(),
        ),
        &env.sdk,
    )
    .await?;
    for id in &ids {
        let _ = read.get(id).await;
    }

    // The writer: a price change every 20 ms, throughout.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (dynamodb, table, ids, writing) = (
            env.dynamodb.clone(),
            table.clone(),
            ids.clone(),
            writing.clone(),
        );
        tokio::spawn(async move {
            let mut written = 0u64;
            let mut version = 1_000u64;
            while writing.load(Ordering::Relaxed) {
                version += 1;
                let id = &ids[fastrand::usize(..ids.len())];
                let sent = dynamodb
                    .update_item()
                    .table_name(&table)
                    .key("productId", AttributeValue::S(id.clone()))
                    .update_expression("SET price = :p, version = :v")
                    .expression_attribute_values(":p", AttributeValue::N(format!("{version}.99")))
                    .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
                    .send()
                    .await;
                written += u64::from(sent.is_ok());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            written
        })
    };

    // 1. Healthy, once the mapping is under way: it finds the stream's shards and starts
    // reading at LATEST within its first seconds, which is its start, not the cache's health.
    let started = Instant::now();
    while poller_stats.records_acknowledged.load(Ordering::Relaxed) == 0 {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the stream poller never acknowledged a record".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let healthy_from = now_secs();
    tokio::time::sleep(sizes.game_day_healthy).await;
    let healthy = (healthy_from, now_secs());

    // 2. A primary killed, left down: its replica serves the shard alone.
    let victim = cluster.primary_except(&[entry]).await?;
    let killed = Instant::now();
    let promoted = cluster.kill(victim).await?;
    // The shard runs on its promoted replica alone from here; the clients' first second on the
    // new topology (slot map refreshed, the killed node's breaker open) belongs to the failover.
    let short_from = now_secs() + 1.0;
    tokio::time::sleep(sizes.game_day_down.saturating_sub(killed.elapsed())).await;
    let short = (short_from, now_secs());
    cluster.revive(victim).await?;
    cluster.await_in_sync(victim).await?;
    tokio::time::sleep(sizes.game_day_healthy / 2).await;

    // 4. Another primary stalled; the cluster fails it over meanwhile.
    let stalled = cluster.primary_except(&[entry, promoted]).await?;
    let replica = cluster.replica_of(stalled).await?;
    let on_stalled = products_on(&cluster, stalled, &ids, &settings.key_prefix).await?;
    cluster.stall(stalled);
    let stall_started = Instant::now();
    let promoted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watching = {
        let promoted_at = promoted_at.clone();
        tokio::spawn(async move {
            while promoted_at.lock().unwrap().is_none() {
                if is_primary(replica).await {
                    *promoted_at.lock().unwrap() = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Until the breaker opens, reads pay the timeout: not what is judged.
    let mut breaker_open = false;
    let (mut stalled_reads, mut unreachable_reads) = (Vec::new(), Vec::new());
    // The first hit on the stalled shard's products once its replica was promoted.
    let mut first_hit: Option<Instant> = None;
    let mut i = 0;
    while stall_started.elapsed() < sizes.game_day_stall {
        let id = &on_stalled[i % on_stalled.len()];
        i += 1;
        let started = Instant::now();
        let (status, _) = read.get(id).await;
        let took = started.elapsed();
        let promoted = *promoted_at.lock().unwrap();
        if status == CacheStatus::Hit && promoted.is_some() {
            first_hit.get_or_insert_with(Instant::now);
        }
        if !breaker_open {
            breaker_open = status == CacheStatus::Bypass && took < settings.redis_timeout / 2;
            continue;
        }
        stalled_reads.push(Cost::wall(took));
        let started = Instant::now();
        let _ = unreachable.get(id).await;
        unreachable_reads.push(Cost::wall(started.elapsed()));
    }
    cluster.resume(stalled);
    let resumed = Instant::now();
    // Hits again, if they did not come back during the stall.
    while first_hit.is_none() && resumed.elapsed() < Duration::from_secs(30) {
        let (status, _) = read.get(&on_stalled[0]).await;
        if status == CacheStatus::Hit && promoted_at.lock().unwrap().is_some() {
            first_hit = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let promoted = *promoted_at.lock().unwrap();
    watching.abort();
    if cluster
        .roles()
        .await?
        .iter()
        .any(|r| r.port == replica && r.primary)
    {
        cluster.await_role(stalled, false).await?;
        cluster.await_in_sync(stalled).await?;
    }
    tokio::time::sleep(sizes.game_day_healthy / 2).await;

    writing.store(false, Ordering::Relaxed);
    let written = writer.await?;
    let drained = Instant::now();
    while poller_stats.records_acknowledged.load(Ordering::Relaxed)
        + poller_stats.records_given_up.load(Ordering::Relaxed)
        < written
        && drained.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_polling.send(());
    polling.await??;

    let lags = poller.function().lags.lock().unwrap().clone();
    // By when the change was made: the changes of a stretch, wherever their invalidation fell.
    let within = |(from, to): (f64, f64)| {
        let mut v: Vec<f64> = lags
            .iter()
            .filter(|(at, lag)| (from..to).contains(&(at - lag / 1e3)))
            .map(|(_, lag)| *lag)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (lag_healthy, lag_short) = (within(healthy), within(short));
    let (stalled_reads, unreachable_reads) = (
        Samples::from(stalled_reads),
        Samples::from(unreachable_reads),
    );
    let given_up = poller_stats.records_given_up.load(Ordering::Relaxed);
    let acknowledged = poller_stats.records_acknowledged.load(Ordering::Relaxed);
    let stream_failure = (given_up > 0 || acknowledged < written).then(|| {
        format!("{written} changes written, {acknowledged} acknowledged, {given_up} given up")
    });
    let counts = format!(
        "{written} changes written, {acknowledged} records acknowledged, {} function errors, {} \
         partial failures, {given_up} given up",
        poller_stats.function_errors.load(Ordering::Relaxed),
        poller_stats.partial_failures.load(Ordering::Relaxed),
    );
    Ok(vec![
        Row {
            figure: "game-day",
            what: "invalidation lag p99, a shard on its promoted replica alone".into(),
            net,
            judged_on: "change to cache",
            unit: Unit::Millis,
            measured: percentile(&lag_short, 0.99),
            baseline: Some(percentile(&lag_healthy, 0.99)),
            baseline_label: "the same, healthy".into(),
            budget: Budget::RatioAtMost(1.5),
            note: format!(
                "3+3 cluster, least-privilege user, REDIS_CONFIRM_REPLICAS=1; {} vs {} records; \
                 p50 {:.0} ms vs {:.0} ms (changes made from a second after the promotion to the \
                 node's return, vs the healthy stretch's; ApproximateCreationDateTime to the \
                 invocation's end; the stream is polled every 250 ms); {counts}",
                lag_short.len(),
                lag_healthy.len(),
                percentile(&lag_short, 0.5),
                percentile(&lag_healthy, 0.5)
            ),
            failure: stream_failure.or_else(|| {
                lag_short
                    .is_empty()
                    .then(|| "no record in the stretch".into())
            }),
        },
        bypass_latency(
            "game-day",
            "read latency p50, a stalled primary's products, breaker open",
            format!(
                "{} reads each side, alternating, over the {} products on the stalled shard, from \
                 the breaker's opening to the end of the 10 s stall (hits once the promoted \
                 replica serves them); p99 {:.2} ms vs {:.2} ms",
                stalled_reads.len(),
                on_stalled.len(),
                stalled_reads.wall(0.99, Unit::Millis),
                unreachable_reads.wall(0.99, Unit::Millis)
            ),
            (!breaker_open).then(|| "the breaker never opened".into()),
        )
        .row(net, &stalled_reads, &unreachable_reads),
        Row {
            figure: "game-day",
            what: "stalled node resumed to hits again on its shard".into(),
            net,
            judged_on: "wall, polled every 5 ms",
            unit: Unit::Millis,
            // Zero when the hits came back during the stall, from the promoted replica.
            measured: first_hit.map_or(f64::NAN, |h| {
                stats::millis(h.saturating_duration_since(resumed))
            }),
            baseline: None,
            baseline_label: String::new(),
            budget: Budget::AtMost(2000.0),
            note: match (promoted, first_hit) {
                (Some(p), Some(h)) => format!(
                    "its replica was promoted {:.1} s into the {:.0} s stall; hits again {:.0} ms \
                     after the promotion",
                    (p - stall_started).as_secs_f64(),
                    sizes.game_day_stall.as_secs_f64(),
                    stats::millis(h.saturating_duration_since(p))
                ),
                _ => "the stalled primary's replica was never promoted".into(),
            },
            failure: first_hit.is_none().then(|| "no hit after the stall".into()),
        },
    ])
}

/// Whether the node on `port` says it is a primary (`ROLE`), within 50 ms.
async fn is_primary(port: u16) -> bool {
    let asked = async {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
        Some(matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(50), asked).await,
        Ok(Some(true))
    )
}

/// The products whose keys live on the primary `port`, by the cluster's view now.
async fn products_on(
    cluster: &RedisCluster,
    port: u16,
    ids: &[String],
    prefix: &str,
) -> Result<Vec<String>, Error> {
    let roles = cluster.roles().await?;
    let node = roles
        .iter()
        .find(|r| r.port == port)
        .ok_or_else(|| format!("no node :{port}"))?;
    let on: Vec<String> = ids
        .iter()
        .filter(|id| {
            node.serves(product_cache::cache::slots::slot_of(&format!(
                "{prefix}{id}"
            )))
        })
        .cloned()
        .collect();
    if on.is_empty() {
        return Err(format!("no product lives on :{port}").into());
    }
    Ok(on)
}
