//! What the cache inspector and the operator commands ask of Redis, beside the functions' own
//! operations: a random sample of product keys from every primary, many keys' values (with
//! their positions) in one round trip, and purging keys together with their leases.
//!
//! None of this is on a request's path, so each call gets a budget that grows with its size
//! rather than the functions' per-call timeout.

use std::collections::BTreeSet;
use std::time::Duration;

use super::topology::{to_node, Conn};
use super::{lease_key, version_key, CacheError, RedisCache};

/// How many times a sample is drawn again when too few product keys came back (side keys and
/// epoch keys are drawn too, and repeats are dropped).
const SAMPLE_ROUNDS: usize = 4;

impl RedisCache {
    fn budget(&self, commands: usize) -> Duration {
        self.timeout + Duration::from_micros(50 * commands as u64) + Duration::from_millis(200)
    }

    /// `pipe` to one node (see [`to_node`]), within a budget for its size.
    async fn bounded_to_node(
        &self,
        conn: &mut Conn,
        pipe: redis::Pipeline,
        node: Option<&(String, u16)>,
    ) -> Result<Vec<redis::Value>, CacheError> {
        let count = pipe.len();
        self.bounded(self.budget(count), to_node(conn, pipe, node.cloned()))
            .await
    }

    /// The primaries to sample: every one on a cluster, the one node otherwise (`None`).
    async fn primaries(&self, conn: &mut Conn) -> Result<Vec<Option<(String, u16)>>, CacheError> {
        match conn {
            Conn::Single(_) => Ok(vec![None]),
            Conn::Cluster(c) => {
                let nodes: BTreeSet<(String, u16)> = self
                    .slot_map(c)
                    .await?
                    .into_iter()
                    .map(|(_, _, node)| node)
                    .collect();
                Ok(nodes.into_iter().map(Some).collect())
            }
        }
    }

    /// Up to `n` distinct product keys (`<prefix><id>`; side keys excluded), drawn at random
    /// from every primary in proportion (`RANDOMKEY`, pipelined: one round trip per primary
    /// and round). Fewer when the cache holds fewer.
    pub async fn sample_keys(&self, prefix: &str, n: usize) -> Result<Vec<String>, CacheError> {
        let mut conn = self.conn().await?;
        let primaries = self.primaries(&mut conn).await?;
        let per_node = n.div_ceil(primaries.len().max(1));
        let mut keys = BTreeSet::new();
        for node in &primaries {
            let mut found = BTreeSet::new();
            for _ in 0..SAMPLE_ROUNDS {
                if found.len() >= per_node {
                    break;
                }
                let mut pipe = redis::pipe();
                for _ in 0..(per_node - found.len()) * 3 {
                    pipe.cmd("RANDOMKEY");
                }
                let before = found.len();
                for reply in self.bounded_to_node(&mut conn, pipe, node.as_ref()).await? {
                    // An error reply (a user without RANDOMKEY) fails the sample: an empty one
                    // would read as "nothing cached", an all-clear that checked nothing.
                    let reply = reply.extract_error()?;
                    if let Ok(Some(key)) = redis::from_redis_value::<Option<String>>(reply) {
                        if key.starts_with(prefix) && found.len() < per_node {
                            found.insert(key);
                        }
                    }
                }
                if found.len() == before {
                    break; // an empty node, or one holding no product keys
                }
            }
            keys.extend(found);
        }
        Ok(keys.into_iter().take(n).collect())
    }

    /// Each key's replies to the `per_key` commands `build` adds for it, in key order. One
    /// pipeline on a single node; on a cluster, whose pipelines must stay in one slot, one per
    /// slot, sent concurrently.
    async fn per_key(
        &self,
        keys: &[String],
        per_key: usize,
        build: impl Fn(&mut redis::Pipeline, &str),
    ) -> Result<Vec<Vec<redis::Value>>, CacheError> {
        use futures::StreamExt as _;
        let conn = self.conn().await?;
        let mut groups: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        for (i, key) in keys.iter().enumerate() {
            let slot = match conn {
                Conn::Single(_) => 0,
                Conn::Cluster(_) => super::slots::slot_of(key),
            };
            groups.entry(slot).or_default().push(i);
        }
        let sent = futures::stream::iter(groups.into_values().map(|group| {
            let mut conn = conn.clone();
            let mut pipe = redis::pipe();
            for &i in &group {
                build(&mut pipe, &keys[i]);
            }
            async move {
                use redis::aio::ConnectionLike as _;
                let replies = self
                    .bounded(
                        self.budget(pipe.len()),
                        conn.req_packed_commands(&pipe, 0, pipe.len()),
                    )
                    .await?;
                Ok::<_, CacheError>((group, replies))
            }
        }))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
        let mut out = vec![Vec::new(); keys.len()];
        for result in sent {
            let (group, replies) = result?;
            for (&i, replies) in group.iter().zip(replies.chunks(per_key)) {
                out[i] = replies
                    .iter()
                    .cloned()
                    .map(redis::Value::extract_error)
                    .collect::<redis::RedisResult<_>>()?;
            }
        }
        Ok(out)
    }

    /// Each key's value and recorded position (`{key}:ver`).
    pub async fn values(
        &self,
        keys: &[String],
    ) -> Result<Vec<(Option<String>, Option<String>)>, CacheError> {
        let replies = self
            .per_key(keys, 2, |pipe, key| {
                pipe.get(key).get(version_key(key));
            })
            .await?;
        replies
            .into_iter()
            .map(|r| {
                redis::from_redis_value(redis::Value::Array(r))
                    .map_err(|e| CacheError::Unexpected(e.to_string()))
            })
            .collect()
    }

    /// Deletes each key with its lease, the way an invalidation does: a reader that took the
    /// lease before cannot fill the old value back afterwards. Its position stays, so ordering
    /// still refuses older records. Returns how many of the keys held a value.
    pub async fn purge(&self, keys: &[String]) -> Result<usize, CacheError> {
        let replies = self
            .per_key(keys, 2, |pipe, key| {
                pipe.del(key).del(lease_key(key));
            })
            .await?;
        Ok(replies
            .iter()
            .filter(|r| matches!(r.first(), Some(redis::Value::Int(1))))
            .count())
    }
}
