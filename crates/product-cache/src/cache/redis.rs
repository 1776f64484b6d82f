//! [`RedisCache`]: the [`Cache`] trait over one Redis node or a Redis Cluster, every operation
//! bounded by a timeout so that a slow or absent Redis costs a request milliseconds, never its
//! answer.

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;

use super::scripts::scripts;
use super::VERSION_TTL;
use super::{
    lease_key, version_key, Cache, CacheError, CacheOp, Fill, Guards, OpKind, Order, Probe,
};

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// A connection to one Redis node or to a Redis Cluster; both multiplex requests and reconnect
/// by themselves (a Lambda environment thawed after minutes may hold a connection the server has
/// long closed).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Clone)]
enum Target {
    Single(ConnectionManager),
    /// Connected on first use, so a function whose cache is down still starts; a failed
    /// connect leaves the cell empty and the next request tries again.
    Cluster(std::sync::Arc<ClusterTarget>),
}

struct ClusterTarget {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

/// The Redis cache: a single node (`RedisCache::new`) or a cluster (`RedisCache::cluster`).
#[derive(Clone)]
pub struct RedisCache {
    target: Target,
    timeout: Duration,
    guards: Guards,
}

impl RedisCache {
    /// A single node, built without connecting, so a function whose Redis is down still starts
    /// and serves from DynamoDB; the first command connects. Built from settings by
    /// [`RedisCache::from_settings`], the one place that knows about secrets and clusters.
    pub(crate) fn single(url: &str, timeout: Duration, guards: Guards) -> Result<Self, CacheError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnect attempts happen in the background of the next commands; keep them few
            // and short so a dead Redis is noticed quickly and retried on later requests.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            target: Target::Single(conn),
            timeout,
            guards,
        })
    }

    /// A Redis Cluster reached through `url` (the ElastiCache configuration endpoint). It
    /// follows MOVED/ASK redirections during resharding and failover.
    pub(crate) fn cluster(
        url: &str,
        timeout: Duration,
        guards: Guards,
    ) -> Result<Self, CacheError> {
        let client = redis::cluster::ClusterClient::builder(vec![url])
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()?;
        Ok(Self {
            target: Target::Cluster(std::sync::Arc::new(ClusterTarget {
                client,
                conn: Default::default(),
            })),
            timeout,
            guards,
        })
    }

    async fn conn(&self) -> Result<Conn, CacheError> {
        match &self.target {
            Target::Single(c) => Ok(Conn::Single(c.clone())),
            Target::Cluster(cluster) => {
                let connect = cluster
                    .conn
                    .get_or_try_init(|| cluster.client.get_async_connection());
                Ok(Conn::Cluster(
                    self.bounded(self.timeout, connect).await?.clone(),
                ))
            }
        }
    }

    async fn bounded<T>(
        &self,
        budget: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(budget, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CacheError::Timeout(budget)),
        }
    }

    fn apply_invocation<'a>(
        &self,
        script: &'a redis::Script,
        op: &CacheOp,
    ) -> redis::ScriptInvocation<'a> {
        let (kind, value, ttl) = match &op.kind {
            OpKind::Delete => ("del", "", Duration::ZERO),
            OpKind::Set { value, ttl } => ("set", value.as_str(), *ttl),
        };
        let mut invocation = script.key(&op.key);
        invocation
            .key(lease_key(&op.key))
            .key(version_key(&op.key))
            .arg(kind)
            .arg(value)
            .arg(secs(ttl))
            .arg(op.order.as_ref().map(Order::encode).unwrap_or_default())
            .arg(secs(VERSION_TTL.max(ttl)))
            .arg(flag(self.guards.ordering))
            .arg(op.created_ms.map(|c| c.to_string()).unwrap_or_default());
        invocation
    }
}

impl Cache for RedisCache {
    async fn probe(&self, key: &str, token: &str, lease: Duration) -> Result<Probe, CacheError> {
        let mut conn = self.conn().await?;
        let mut invocation = scripts().probe.key(key);
        invocation
            .key(lease_key(key))
            .arg(token)
            .arg(lease.as_millis().max(1) as u64)
            .arg(flag(self.guards.leases));
        let (tag, value): (u8, Option<String>) = self
            .bounded(self.timeout, invocation.invoke_async(&mut conn))
            .await?;
        match (tag, value) {
            (1, Some(v)) => Ok(Probe::Hit(v)),
            (2, _) => Ok(Probe::Lease),
            (3, _) => Ok(Probe::Wait),
            other => Err(CacheError::Unexpected(format!("probe replied {other:?}"))),
        }
    }

    async fn fill(&self, fill: Fill<'_>) -> Result<bool, CacheError> {
        let mut conn = self.conn().await?;
        let mut invocation = scripts().fill.key(fill.key);
        invocation
            .key(lease_key(fill.key))
            .key(version_key(fill.key))
            .arg(fill.token)
            .arg(fill.value)
            .arg(secs(fill.ttl))
            .arg(fill.order.map(Order::encode).unwrap_or_default())
            .arg(secs(VERSION_TTL.max(fill.ttl)))
            .arg(flag(self.guards.leases))
            .arg(flag(self.guards.ordering));
        let written: u8 = self
            .bounded(self.timeout, invocation.invoke_async(&mut conn))
            .await?;
        Ok(written == 1)
    }

    async fn apply(&self, ops: &[CacheOp]) -> Result<(), CacheError> {
        if ops.is_empty() {
            return Ok(());
        }
        let script = &scripts().apply;
        let mut conn = self.conn().await?;
        // A batch is thousands of commands: give it the per-operation budget per 1,000.
        let budget = self.timeout * (ops.len() / 1000 + 1) as u32;
        if let Conn::Cluster(_) = conn {
            // A cluster pipeline must stay within one node, and a batch spans them all. Keys
            // go out concurrently; each key's ops stay in order, which is all that matters.
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut group_of = std::collections::HashMap::new();
            for (i, op) in ops.iter().enumerate() {
                let g = *group_of.entry(op.key.as_str()).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(i);
            }
            let work = futures::stream::iter(groups)
                .map(|group: Vec<usize>| {
                    let mut conn = conn.clone();
                    async move {
                        for i in group {
                            // invoke_async loads the script on the node if it answers NOSCRIPT.
                            self.apply_invocation(script, &ops[i])
                                .invoke_async::<()>(&mut conn)
                                .await?;
                        }
                        Ok::<(), redis::RedisError>(())
                    }
                })
                .buffer_unordered(64)
                .try_collect::<Vec<()>>();
            return self.bounded(budget, async { work.await.map(drop) }).await;
        }
        let mut pipe = redis::pipe();
        // Loading first in the same pipeline means a Redis that restarted (and forgot its
        // scripts) since the last batch still runs every EVALSHA that follows.
        pipe.load_script(script).ignore();
        for op in ops {
            pipe.invoke_script(&self.apply_invocation(script, op))
                .ignore();
        }
        self.bounded(budget, pipe.query_async::<()>(&mut conn))
            .await
    }
}

impl RedisCache {
    /// A plain GET, for tools and tests that look without taking a lease.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut conn = self.conn().await?;
        self.bounded(self.timeout, conn.get(key)).await
    }
}
