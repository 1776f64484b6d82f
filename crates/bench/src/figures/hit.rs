//! A hit: Redis's own time per hit under sustained load, and the handler's latency, each
//! against a plain `GET` of the same key on the same kind of connection.

use std::sync::Arc;

use product_cache::config::CacheSettings;
use product_cache::document::Document;
use product_cache::read::{CacheStatus, ReadPath};

use crate::compare::{alternate, timed, Compare, Order, Samples, ThroughProxy, PRODUCT};
use crate::env::Env;
use crate::records::{image, item_of};
use crate::report::{Budget, Net, Row, Unit};
use crate::stats;
use crate::{Error, Sizes};

const ID: &str = "bench-hot-1";
const KEY: &str = "product:bench-hot-1";
/// Requests per block of [`alternate`].
const BLOCK: usize = 100;

/// Caches the hot product's document (about 400 bytes) and returns it.
async fn cache_the_product(env: &Env) -> Result<String, Error> {
    let doc = Document::from_item(&item_of(&image(ID, "129.99", 1, 200)))?.into_string();
    redis::cmd("SET")
        .arg(KEY)
        .arg(&doc)
        .arg("EX")
        .arg(3600)
        .query_async::<()>(&mut env.control())
        .await?;
    Ok(doc)
}

type Read = ReadPath<product_cache::cache::RedisCache, product_cache::store::DynamoStore>;

async fn read_path(env: &Env, net: Net) -> Result<Read, Error> {
    // The table is never read: every request is a hit.
    let settings = env.read_settings(net, "bench-unused", CacheSettings::default());
    Ok(ReadPath::build(settings, &env.sdk).await?)
}

async fn hit(read: &Read) -> bool {
    matches!(read.get(ID).await, (CacheStatus::Hit, Ok(_)))
}

async fn raw_get(conn: &mut redis::aio::ConnectionManager) -> bool {
    redis::cmd("GET")
        .arg(KEY)
        .query_async::<Option<String>>(conn)
        .await
        .is_ok_and(|v| v.is_some())
}

/// Rounds of sustained load per side in the command-time figure.
const ROUNDS: u32 = 5;

/// One side of the command-time figure, summed over its rounds.
#[derive(Default)]
struct Side {
    ok: u64,
    bad: u64,
    elapsed: std::time::Duration,
    redis_usec: f64,
    top_level_calls: f64,
    cpu_secs: f64,
}

impl Side {
    /// Runs one round of `load` with Redis's counters reset before it, and adds what it cost.
    async fn round(
        &mut self,
        env: &Env,
        mix: &stats::Mix,
        load: impl std::future::Future<Output = stats::Load>,
    ) -> Result<(), Error> {
        env.resetstat().await?;
        let cpu = env.cpu_seconds().await?;
        let load = load.await;
        self.cpu_secs += env.cpu_seconds().await? - cpu;
        let counted = env.commandstats().await?;
        self.redis_usec += stats::redis_time(&counted, mix);
        self.top_level_calls += stats::top_level_calls(&counted, mix);
        self.ok += load.ok;
        self.bad += load.bad;
        self.elapsed += load.elapsed;
        Ok(())
    }
}

/// Redis command time per hit, from `INFO commandstats`, with callers keeping Redis busy.
pub async fn redis_time(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    cache_the_product(env).await?;
    let read = Arc::new(read_path(env, net).await?);
    let conn = env.raw_conn(net).await?;
    for _ in 0..200 {
        if !hit(&read).await {
            return Err("the warm-up read of a cached product was not a hit".into());
        }
        raw_get(&mut conn.clone()).await;
    }
    let port = env.redis.server().port();

    let (_, product_mix) = stats::sample_mix(port, &mut env.control(), async {
        for _ in 0..200 {
            hit(&read).await;
        }
    })
    .await?;
    let (_, baseline_mix) = stats::sample_mix(port, &mut env.control(), async {
        for _ in 0..200 {
            raw_get(&mut conn.clone()).await;
        }
    })
    .await?;

    let round_time = sizes.load_time / ROUNDS;
    let (mut product, mut baseline) = (Side::default(), Side::default());
    alternate(
        ROUNDS as usize,
        [1, 1],
        Order::Fixed,
        async |side, _| match side {
            PRODUCT => {
                let load = {
                    let read = read.clone();
                    stats::sustained(sizes.load_callers, round_time, move || {
                        let read = read.clone();
                        async move { hit(&read).await }
                    })
                };
                product.round(env, &product_mix, load).await
            }
            _ => {
                let load = {
                    let conn = conn.clone();
                    stats::sustained(sizes.load_callers, round_time, move || {
                        let mut conn = conn.clone();
                        async move { raw_get(&mut conn).await }
                    })
                };
                baseline.round(env, &baseline_mix, load).await
            }
        },
    )
    .await?;

    let requests = (product.ok + product.bad).max(1) as f64;
    let per_hit = product.redis_usec / requests;
    let commands_per_hit = product.top_level_calls / requests;
    let gets = (baseline.ok + baseline.bad).max(1) as f64;
    let per_get = baseline.redis_usec / gets;
    let (product_cpu, baseline_cpu) = (product.cpu_secs, baseline.cpu_secs);
    let rate = |side: &Side| side.ok as f64 / side.elapsed.as_secs_f64();
    let mut note = format!(
        "{} callers, {ROUNDS} alternating rounds of {:.1} s each side: {:.0} hits/s vs {:.0} GET/s; a hit is {} ({commands_per_hit:.2} top-level commands); whole-process CPU (INFO cpu) {:.1} us vs {:.1} us",
        sizes.load_callers,
        round_time.as_secs_f64(),
        rate(&product),
        rate(&baseline),
        product_mix.describe(),
        product_cpu * 1e6 / requests,
        baseline_cpu * 1e6 / gets,
    );
    if net == Net::Proxy {
        note.push_str("; server-side time, so the proxy changes little");
    }
    let failure = (product.bad > 0 || baseline.bad > 0).then(|| {
        format!(
            "{} of the product's reads were not hits, {} GETs failed",
            product.bad, baseline.bad
        )
    });
    Ok(vec![Row {
        figure: "hit-redis-time",
        what: "Redis command time per hit, sustained load".into(),
        net,
        judged_on: "INFO commandstats usec",
        unit: Unit::Micros,
        measured: per_hit,
        baseline: Some(per_get),
        baseline_label: "GET of the same key".into(),
        budget: Budget::RatioAtMost(1.3),
        note,
        failure,
    }])
}

/// Sequential requests: wall time and, through the proxy, round trips per request.
pub async fn latency(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    cache_the_product(env).await?;
    let read = read_path(env, net).await?;
    let mut conn = env.raw_conn(net).await?;
    for _ in 0..200 {
        hit(&read).await;
        raw_get(&mut conn).await;
    }
    let requests = match net {
        Net::Loopback => sizes.latency_requests,
        Net::Proxy => sizes.latency_requests_proxy,
    };
    let mut misses = 0;
    let [product, baseline] = alternate(
        requests.div_ceil(BLOCK),
        [BLOCK, BLOCK],
        Order::Fixed,
        async |side, _| {
            let (ok, cost) = match side {
                PRODUCT => timed(env, hit(&read)).await,
                _ => timed(env, raw_get(&mut conn)).await,
            };
            misses += usize::from(!ok);
            Ok(cost)
        },
    )
    .await?
    .map(Samples::from);
    let failure = (misses > 0).then(|| format!("{misses} requests were not hits"));
    let rows = [(0.5, "p50", 1.1), (0.99, "p99", 1.3)].map(|(p, label, limit)| {
        Compare {
            figure: "hit-latency",
            what: format!("hit handler latency {label}"),
            baseline_label: "raw GET, connection manager".into(),
            budget: Budget::RatioAtMost(limit),
            unit: Unit::Micros,
            p,
            through_proxy: ThroughProxy::RoundTrips,
            note: match net {
                Net::Loopback => format!("{requests} sequential requests each"),
                Net::Proxy => String::new(),
            },
            failure: failure.clone(),
        }
        .row(net, &product, &baseline)
    });
    Ok(rows.into())
}
