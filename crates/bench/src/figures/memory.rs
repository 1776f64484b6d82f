//! What the cache costs a node in memory, by Redis's own accounting on fresh nodes (one
//! standalone, one in cluster mode owning every slot, since a cluster-mode node keeps more per
//! key): the `used_memory` delta per key written, which includes the key's dict entry, its
//! expires entry and the dicts' bucket arrays, for each kind of key the cache writes, with
//! `MEMORY USAGE` of a sample key (the key and its value only) for comparison. Documents and
//! leases are written by the product's read path (probe, then fill); positions and epochs with
//! the command the apply script uses for them, and, as a cross-check, documents with positions
//! by the invalidator. Not a ratio against a baseline: the budgets are absolute, about twice
//! what was measured, to catch a change that doubles a size. The sizes behind docs/deploying.md's
//! "Sizing the cache node".

use std::time::{Duration, Instant};

use local_stack::services::RedisServer;
use product_cache::cache::slots::{epoch_key_of_slot, SLOTS};
use product_cache::cache::{lease_key, version_key, Cache, Fill, Probe, RedisCache, VERSION_TTL};
use product_cache::config::{CacheSettings, InvalidationMode, InvalidatorSettings, RedisSettings};
use product_cache::document::Document;
use product_cache::invalidate::Invalidator;
use redis::aio::MultiplexedConnection;

use crate::env::Env;
use crate::records::{self, image, item_of};
use crate::report::{Budget, Net, Row, Unit};
use crate::stats;
use crate::{Error, Sizes};

const FIGURE: &str = "memory";

/// Keys per pipeline while filling.
const PIPELINE: usize = 500;

/// Leases the read path takes while measuring: long enough that none lapses meanwhile (a
/// lease's size does not depend on how long it lasts).
const LEASE: Duration = Duration::from_secs(60);

/// Concurrent callers writing through the read path.
const CALLERS: usize = 16;

/// A fresh node, a connection to it, and the product's cache on it.
struct Node {
    _server: RedisServer,
    conn: MultiplexedConnection,
    /// How the product reaches it: as a cluster, for the one in cluster mode.
    redis: RedisSettings,
    cache: RedisCache,
}

impl Node {
    async fn start(env: &Env, cluster_mode: bool) -> Result<Node, Error> {
        let args: &[&str] = if cluster_mode {
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]
        } else {
            &[]
        };
        let server = RedisServer::start_with(args).await?;
        let url = server.url();
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        if cluster_mode {
            // A cluster of one that owns every slot: every key is written to it directly.
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(0)
                .arg(SLOTS - 1)
                .query_async::<()>(&mut conn)
                .await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await?;
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("a one-node cluster never reached cluster_state:ok".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let redis = RedisSettings {
            cluster: cluster_mode,
            ..RedisSettings::new(url)
        };
        let cache = RedisCache::from_settings(&redis, &settings(), &env.sdk).await?;
        Ok(Node {
            _server: server,
            conn,
            redis,
            cache,
        })
    }

    /// What the dataset holds: `used_memory` less the clients' buffers (a pipeline's query
    /// buffer is not the keys' memory).
    async fn used(&self) -> Result<i64, Error> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn.clone())
            .await?;
        let field = |name| stats::info_field(&info, name) as i64;
        Ok(field("used_memory") - field("mem_clients_normal"))
    }

    /// `used()` once the server's cron has finished any dict rehashing the writes started.
    async fn settled(&self) -> Result<i64, Error> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.used().await
    }

    async fn flushall(&self) -> Result<(), Error> {
        redis::cmd("FLUSHALL")
            .arg("SYNC")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn memory_usage(&self, key: &str) -> Result<i64, Error> {
        Ok(redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async::<Option<i64>>(&mut self.conn.clone())
            .await?
            .unwrap_or(0))
    }

    async fn write(&self, writes: &Writes) -> Result<(), Error> {
        match writes {
            Writes::Commands(cmds) => {
                for chunk in cmds.chunks(PIPELINE) {
                    let mut pipe = redis::pipe();
                    for cmd in chunk {
                        pipe.add_command(cmd.clone()).ignore();
                    }
                    pipe.query_async::<()>(&mut self.conn.clone()).await?;
                }
            }
            Writes::Fills(docs) => {
                self.through_read_path(docs.iter().map(|(k, d)| (k.clone(), Some(d.clone()))))
                    .await?
            }
            Writes::Leases(keys) => {
                self.through_read_path(keys.iter().map(|k| (k.clone(), None)))
                    .await?
            }
        }
        Ok(())
    }

    /// Each key's miss as the read path has it: the probe takes the lease, then, with a
    /// document, the fill writes it (and hands the lease back); without one the lease stays.
    async fn through_read_path(
        &self,
        keys: impl Iterator<Item = (String, Option<String>)>,
    ) -> Result<(), Error> {
        let keys: Vec<(String, Option<String>)> = keys.collect();
        let per_caller = keys.len().div_ceil(CALLERS);
        let ttl = settings().ttl;
        let mut callers = tokio::task::JoinSet::new();
        for part in keys.chunks(per_caller.max(1)) {
            let part = part.to_vec();
            let cache = self.cache.clone();
            callers.spawn(async move {
                for (key, doc) in part {
                    let token = format!("{:032x}", fastrand::u128(..));
                    if cache.probe(&key, &token, LEASE).await? != Probe::Lease {
                        return Err(format!("the probe of {key} did not take its lease").into());
                    }
                    if let Some(value) = doc {
                        let fill = Fill {
                            key: key.clone(),
                            token,
                            value,
                            ttl,
                            order: None,
                        };
                        if !cache.fill(fill).await? {
                            return Err(format!("the fill of {key} was refused").into());
                        }
                    }
                }
                Ok::<(), Error>(())
            });
        }
        while let Some(done) = callers.join_next().await {
            done??;
        }
        Ok(())
    }

    /// Bytes per key: the `used_memory` delta of `writes` on an empty node.
    async fn per_key(&self, writes: &Writes) -> Result<f64, Error> {
        self.flushall().await?;
        // FLUSHALL SYNC has freed everything by the time it answers: nothing to settle.
        let before = self.used().await?;
        self.write(writes).await?;
        let after = self.settled().await?;
        Ok((after - before) as f64 / writes.len() as f64)
    }
}

fn settings() -> CacheSettings {
    CacheSettings {
        redis_timeout: Duration::from_secs(2),
        ..CacheSettings::default()
    }
}

/// How a kind of key gets written.
enum Writes {
    /// As the apply script writes it, one command per key.
    Commands(Vec<redis::Cmd>),
    /// A miss's lease, then its fill: the document, key and value.
    Fills(Vec<(String, String)>),
    /// A miss's lease, left held.
    Leases(Vec<String>),
}

impl Writes {
    fn len(&self) -> usize {
        match self {
            Writes::Commands(c) => c.len(),
            Writes::Fills(f) => f.len(),
            Writes::Leases(l) => l.len(),
        }
    }
}

/// A kind of key the cache writes, how `n` of them are written, and a sample key.
struct Kind {
    what: String,
    /// The value's size, for the note.
    value_bytes: usize,
    writes: Writes,
    sample: String,
    budget: f64,
}

fn document(id: &str, padding: usize) -> Result<String, Error> {
    Ok(Document::from_item(&item_of(&image(id, "19.99", 7, padding)))?.into_string())
}

/// `image`'s padding for a document of about 1 KB.
const KB_PADDING: usize = 850;

fn kinds(sizes: &Sizes, prefix: &str) -> Result<Vec<Kind>, Error> {
    let n = sizes.memory_keys;
    let ids: Vec<String> = (0..n).map(|i| format!("bench-m-{i:07}")).collect();
    let key = |id: &str| format!("{prefix}{id}");
    let mut kinds = Vec::new();
    for (padding, count, budget) in [
        (sizes.refresh_bytes, n / 4, 12_000.0),
        (KB_PADDING, n, 2800.0),
    ] {
        let sample = document(&ids[0], padding)?;
        let docs = ids[..count]
            .iter()
            .map(|id| Ok((key(id), document(id, padding)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        kinds.push(Kind {
            what: format!(
                "cached document of {:.1} KB, key {prefix}<id>",
                sample.len() as f64 / 1024.0
            ),
            value_bytes: sample.len(),
            writes: Writes::Fills(docs),
            sample: key(&ids[0]),
            budget,
        });
    }
    // A position as the apply script records it: a 21-digit sequence number, 25 hours.
    let position = format!("S21:{}:0", records::next_sequence_number());
    kinds.push(Kind {
        what: format!("position, key {{{prefix}<id>}}:ver"),
        value_bytes: position.len(),
        writes: Writes::Commands(
            ids.iter()
                .map(|id| {
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(version_key(&key(id)))
                        .arg(&position)
                        .arg("EX")
                        .arg(VERSION_TTL.as_secs());
                    cmd
                })
                .collect(),
        ),
        sample: version_key(&key(&ids[0])),
        budget: 350.0,
    });
    // A slot's epoch as a write leaves it (`<ms>:<evicted_keys>`), no TTL: all 16,384.
    let epoch = format!(
        "{}:0",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    kinds.push(Kind {
        what: "epoch key, product-cache:epoch:{<tag>}".into(),
        value_bytes: epoch.len(),
        writes: Writes::Commands(
            (0..SLOTS)
                .map(|slot| {
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(epoch_key_of_slot(slot)).arg(&epoch);
                    cmd
                })
                .collect(),
        ),
        sample: epoch_key_of_slot(0),
        budget: 250.0,
    });
    kinds.push(Kind {
        what: format!("held lease, key {{{prefix}<id>}}:lease"),
        value_bytes: 0,
        writes: Writes::Leases(ids.iter().map(|id| key(id)).collect()),
        sample: lease_key(&key(&ids[0])),
        budget: 450.0,
    });
    Ok(kinds)
}

/// Refreshes through the invalidator, `n` products of ~1 KB in batches of 1,000: document and
/// position per product, as the product writes them (staged, renamed into place). The cross-
/// check of the rows above it.
async fn refreshed_per_item(env: &Env, node: &Node, n: usize) -> Result<f64, Error> {
    node.flushall().await?;
    let settings = InvalidatorSettings {
        redis: node.redis.clone(),
        mode: InvalidationMode::Refresh,
        cache: settings(),
    };
    let inv = Invalidator::build(settings, &env.sdk).await?;
    inv.cache().declare_empty().await?;
    let batch = |ids: &[String]| {
        records::event(
            ids.iter()
                .map(|id| {
                    let new = image(id, "19.99", 7, KB_PADDING);
                    records::record("MODIFY", id, Some(new), None, "NEW_IMAGE")
                })
                .collect(),
        )
    };
    // Loads the script. A slot's first write turns its epoch `0:?` into `0:<count>`, the same
    // size, so what follows adds only documents and positions.
    let warm: Vec<String> = (0..10).map(|i| format!("bench-w-{i:02}")).collect();
    inv.handle(batch(&warm)).await;
    let before = node.settled().await?;
    let ids: Vec<String> = (0..n).map(|i| format!("bench-r-{i:07}")).collect();
    let mut failed = 0;
    for chunk in ids.chunks(1000) {
        failed += inv.handle(batch(chunk)).await.batch_item_failures.len();
    }
    if failed > 0 {
        return Err(format!("the refreshes reported {failed} failures").into());
    }
    let after = node.settled().await?;
    let written = redis::cmd("EXISTS")
        .arg(format!("product:{}", ids[n - 1]))
        .query_async::<i64>(&mut node.conn.clone())
        .await?;
    if written != 1 {
        return Err("a refresh did not leave its document in Redis".into());
    }
    Ok((after - before) as f64 / n as f64)
}

pub async fn run(env: &Env, sizes: &Sizes, net: Net) -> Result<Vec<Row>, Error> {
    // Sizes do not depend on the network.
    if net == Net::Proxy {
        return Ok(Vec::new());
    }
    let prefix = CacheSettings::default().key_prefix;
    let kinds = kinds(sizes, &prefix)?;
    let standalone = Node::start(env, false).await?;
    let clustered = Node::start(env, true).await?;
    let mut rows = Vec::new();
    for kind in &kinds {
        let single = standalone.per_key(&kind.writes).await?;
        let usage = standalone.memory_usage(&kind.sample).await?;
        let in_cluster = clustered.per_key(&kind.writes).await?;
        let value = match kind.value_bytes {
            0 => "-".to_owned(),
            b => format!("value {b} B"),
        };
        rows.push(Row {
            figure: FIGURE,
            what: format!("bytes per {}", kind.what),
            net,
            judged_on: "used_memory delta per key",
            unit: Unit::Bytes,
            measured: single,
            baseline: None,
            baseline_label: value,
            budget: Budget::AtMost(kind.budget),
            note: format!(
                "{} keys on a fresh standalone node; cluster mode {in_cluster:.0} B; MEMORY USAGE of one {usage} B (key and value, no dict or expires entry)",
                kind.writes.len()
            ),
            failure: None,
        });
    }
    // Half as many products: as many keys as each row above, the dicts as full.
    let n = sizes.memory_keys / 2;
    let single = refreshed_per_item(env, &standalone, n).await?;
    let in_cluster = refreshed_per_item(env, &clustered, n).await?;
    rows.push(Row {
        figure: FIGURE,
        what: "bytes per refreshed ~1 KB item (document + position), through the invalidator"
            .into(),
        net,
        judged_on: "used_memory delta per item",
        unit: Unit::Bytes,
        measured: single,
        baseline: None,
        baseline_label: "-".into(),
        budget: Budget::AtMost(3200.0),
        note: format!(
            "{n} products refreshed in batches of 1,000 on a fresh standalone node; cluster mode {in_cluster:.0} B; the cross-check of the document and position rows"
        ),
        failure: None,
    });
    Ok(rows)
}
