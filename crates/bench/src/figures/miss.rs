//! A miss: the handler's answer latency (`GET`, the lease-taking probe, `GetItem`; the
//! lease-guarded fill runs after the response, as the read function runs it) against a plain
//! cache-aside miss (`GET` that finds nothing, `GetItem`, `SET`) in the same run: issue 9's open
//! budget was decided so, since every cache-aside miss starts with that `GET`. Leases must cost
//! the reader nothing on the response path: at most 1.1x, and at most 2 Redis round trips before
//! the answer. The bare `GetItem` + `SET` stays in the note.
//!
//! The timed section ends when [`ReadPath::answer`] has the answer; the fill it leaves is awaited
//! outside it, before the next sample, as a Lambda environment serves one request at a time and
//! its extension holds the invocation until the fill has landed. Through the proxy the note
//! gives the Redis round trips before the answer and in all, fill included.

use std::time::Instant;

use aws_sdk_dynamodb::types::AttributeValue;
use product_cache::config::CacheSettings;
use product_cache::document::Document;
use product_cache::read::{CacheStatus, Lookup, ReadPath};

use crate::env::Env;
use crate::report::{Budget, Net, Row, Unit};
use crate::stats::{self, percentile};
use crate::{Error, Sizes};

/// A table with `n` catalog products, for the miss and cold-start figures.
pub async fn prepare_table(env: &Env, n: usize) -> Result<(String, Vec<String>), Error> {
    let table = format!("bench-miss-{}", std::process::id());
    local_stack::table::ensure_table(
        &env.dynamodb,
        &table,
        "productId",
        product_cache::id::KeyType::S,
    )
    .await?;
    let products = local_stack::seed::catalog(n);
    let items = products.iter().map(|p| p.item("productId")).collect();
    local_stack::seed::batch_write(&env.dynamodb, &table, items).await?;
    Ok((table, products.into_iter().map(|p| p.id).collect()))
}

/// `GetItem` (strongly consistent, as the read path's default) and `SET` of the same document.
async fn bare(
    env: &Env,
    table: &str,
    conn: &mut redis::aio::ConnectionManager,
    id: &str,
) -> Result<(), Error> {
    let out = env
        .dynamodb
        .get_item()
        .table_name(table)
        .key("productId", AttributeValue::S(id.to_owned()))
        .consistent_read(true)
        .send()
        .await?;
    let item = out
        .item
        .ok_or("the baseline's product is not in the table")?;
    let doc = Document::from_item(&serde_dynamo::Item::from(item).into_inner())?;
    redis::cmd("SET")
        .arg(format!("product:{id}"))
        .arg(doc.as_str())
        .arg("EX")
        .arg(3600)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// What a plain cache-aside miss does, leases aside: the `GET` that finds nothing, then
/// [`bare`]. The budget's baseline.
async fn plain(
    env: &Env,
    table: &str,
    conn: &mut redis::aio::ConnectionManager,
    id: &str,
) -> Result<(), Error> {
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!("product:{id}"))
        .query_async(conn)
        .await?;
    if cached.is_some() {
        return Err("the plain miss's product was cached".into());
    }
    bare(env, table, conn, id).await
}

/// `ids` holds this run's products, none of them cached.
pub async fn latency(
    env: &Env,
    sizes: &Sizes,
    net: Net,
    table: &str,
    ids: &[String],
) -> Result<Vec<Row>, Error> {
    env.flushall().await?;
    let read = ReadPath::build(
        env.read_settings(net, table, CacheSettings::default()),
        &env.sdk,
    )
    .await?;
    let mut conn = env.raw_conn(net).await?;
    let n = sizes.misses.min(ids.len().saturating_sub(10) / 3);
    let (warm, ids) = ids.split_at(10);
    // Connections to Redis and moto are opened by the first requests: not part of a miss.
    for pair in warm.chunks(2) {
        let _ = read.get(&pair[0]).await;
        if let Some(id) = pair.get(1) {
            bare(env, table, &mut conn, id).await?;
        }
    }
    let (mut product_ms, mut product_rt, mut product_all_rt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut baseline_ms, mut baseline_rt) = (Vec::new(), Vec::new());
    let (mut plain_ms, mut plain_rt) = (Vec::new(), Vec::new());
    let mut not_misses = 0;
    for i in 0..n {
        let (a, b, c) = (&ids[3 * i], &ids[3 * i + 1], &ids[3 * i + 2]);
        // Rotate which goes first.
        for turn in 0..3 {
            if (turn + i) % 3 == 2 {
                let rt = env.round_trips();
                let started = Instant::now();
                plain(env, table, &mut conn, c).await?;
                plain_ms.push(stats::millis(started.elapsed()));
                plain_rt.push((env.round_trips() - rt) as f64);
            } else if (turn + i) % 3 == 0 {
                let rt = env.round_trips();
                let started = Instant::now();
                let (status, result, fill) = read.answer(a).await;
                product_ms.push(stats::millis(started.elapsed()));
                product_rt.push((env.round_trips() - rt) as f64);
                // After the response, untimed; the next sample starts once it is done.
                fill.await;
                product_all_rt.push((env.round_trips() - rt) as f64);
                if status != CacheStatus::Miss || !matches!(result, Ok(Lookup::Found(_))) {
                    not_misses += 1;
                }
            } else {
                let rt = env.round_trips();
                let started = Instant::now();
                bare(env, table, &mut conn, b).await?;
                baseline_ms.push(stats::millis(started.elapsed()));
                baseline_rt.push((env.round_trips() - rt) as f64);
            }
        }
    }
    for v in [
        &mut product_ms,
        &mut product_rt,
        &mut product_all_rt,
        &mut baseline_ms,
        &mut baseline_rt,
        &mut plain_ms,
        &mut plain_rt,
    ] {
        v.sort_by(f64::total_cmp);
    }
    let p50 = (percentile(&product_ms, 0.5), percentile(&plain_ms, 0.5));
    let p99 = (percentile(&product_ms, 0.99), percentile(&plain_ms, 0.99));
    let bare_p50 = percentile(&baseline_ms, 0.5);
    let mut note = String::from("answer latency; the fill runs after the response");
    if net == Net::Proxy {
        note.push_str(&format!(
            ": {:.0} round trips before the answer, {:.0} in all (plain: {:.0})",
            percentile(&product_rt, 0.5),
            percentile(&product_all_rt, 0.5),
            percentile(&plain_rt, 0.5)
        ));
    }
    note.push_str(&format!(
        "; {n} misses each; p99 {:.2} ms vs {:.2} ms; vs a bare GetItem + SET (not judged) {:.2}x of {bare_p50:.2} ms; DynamoDB is moto",
        p99.0,
        p99.1,
        p50.0 / bare_p50
    ));
    let failure = (not_misses > 0).then(|| format!("{not_misses} reads were not misses"));
    let mut rows = vec![Row {
        figure: "miss-latency",
        what: "miss answer latency p50".into(),
        net,
        judged_on: "wall",
        unit: Unit::Millis,
        measured: p50.0,
        baseline: Some(p50.1),
        baseline_label: "plain cache-aside miss: GET, GetItem, SET".into(),
        budget: Budget::RatioAtMost(1.1),
        note,
        failure: failure.clone(),
    }];
    if net == Net::Proxy {
        rows.push(Row {
            figure: "miss-latency",
            what: "miss round trips before the answer".into(),
            net,
            judged_on: "round trips",
            unit: Unit::RoundTrips,
            measured: percentile(&product_rt, 0.5),
            baseline: Some(percentile(&plain_rt, 0.5)),
            baseline_label: "plain cache-aside miss: GET, GetItem, SET".into(),
            budget: Budget::AtMost(2.0),
            note: format!(
                "median; {:.0} in all with the fill after the response",
                percentile(&product_all_rt, 0.5)
            ),
            failure,
        });
    }
    Ok(rows)
}
