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

use aws_sdk_dynamodb::types::AttributeValue;
use product_cache::config::CacheSettings;
use product_cache::document::Document;
use product_cache::read::{CacheStatus, Lookup, ReadPath};

use crate::compare::{
    alternate, timed, trips_since, Compare, Cost, Counted, Order, Samples, ThroughProxy, PRODUCT,
};
use crate::env::Env;
use crate::report::{Budget, Net, Row, Unit};
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

/// The bare `GetItem` + `SET`'s side in [`alternate`], after the product's; the plain miss's
/// is the third.
const BARE: usize = 1;

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
    let mut product_all = Samples::default();
    let mut not_misses = 0;
    // Each round its own three products; which side goes first rotates.
    let [product, bare_samples, plain_samples] =
        alternate(n, [1, 1, 1], Order::Rotate, async |side, round| {
            let id = &ids[3 * round + side];
            Ok(match side {
                PRODUCT => {
                    let before = env.counts();
                    let ((status, result, fill), cost) = timed(env, read.answer(id)).await;
                    // After the response, untimed; the next sample starts once it is done.
                    fill.await;
                    let (round_trips, busiest) = trips_since(env, &before);
                    product_all.push(Cost {
                        wall: cost.wall,
                        round_trips,
                        busiest,
                    });
                    if status != CacheStatus::Miss || !matches!(result, Ok(Lookup::Found(_))) {
                        not_misses += 1;
                    }
                    cost
                }
                BARE => {
                    let (out, cost) = timed(env, bare(env, table, &mut conn, id)).await;
                    out?;
                    cost
                }
                _ => {
                    let (out, cost) = timed(env, plain(env, table, &mut conn, id)).await;
                    out?;
                    cost
                }
            })
        })
        .await?
        .map(Samples::from);
    let p50 = product.wall(0.5, Unit::Millis);
    let p99 = (
        product.wall(0.99, Unit::Millis),
        plain_samples.wall(0.99, Unit::Millis),
    );
    let bare_p50 = bare_samples.wall(0.5, Unit::Millis);
    let mut note = String::from("answer latency; the fill runs after the response");
    if net == Net::Proxy {
        note.push_str(&format!(
            ": {:.0} round trips before the answer, {:.0} in all (plain: {:.0})",
            product.round_trips(0.5),
            product_all.round_trips(0.5),
            plain_samples.round_trips(0.5)
        ));
    }
    note.push_str(&format!(
        "; {n} misses each; p99 {:.2} ms vs {:.2} ms; vs a bare GetItem + SET (not judged) {:.2}x of {bare_p50:.2} ms; DynamoDB is moto",
        p99.0,
        p99.1,
        p50 / bare_p50
    ));
    let failure = (not_misses > 0).then(|| format!("{not_misses} reads were not misses"));
    let mut rows = vec![Compare {
        figure: "miss-latency",
        what: "miss answer latency p50".into(),
        baseline_label: "plain cache-aside miss: GET, GetItem, SET".into(),
        budget: Budget::RatioAtMost(1.1),
        unit: Unit::Millis,
        p: 0.5,
        // The round trips are in the note, before and after the answer.
        through_proxy: ThroughProxy::WallAsNoted,
        note,
        failure: failure.clone(),
    }
    .row(net, &product, &plain_samples)];
    if net == Net::Proxy {
        rows.push(Row {
            figure: "miss-latency",
            what: "miss round trips before the answer".into(),
            net,
            judged_on: "round trips",
            unit: Unit::RoundTrips,
            measured: product.round_trips(0.5),
            baseline: Some(plain_samples.round_trips(0.5)),
            baseline_label: "plain cache-aside miss: GET, GetItem, SET".into(),
            budget: Budget::AtMost(2.0),
            note: format!(
                "median; {:.0} in all with the fill after the response",
                product_all.round_trips(0.5)
            ),
            failure,
        });
    }
    Ok(rows)
}
