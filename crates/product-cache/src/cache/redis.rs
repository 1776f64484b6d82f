//! Layer 4: [`RedisCache`], the [`Cache`] trait over one Redis node or a Redis Cluster, built
//! from settings. A facade: every operation is one of `ops/`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::node::breaker::Breakers;
use super::node::call::Caller;
use super::node::conn::{Connect, ConnectOptions, Pool};
use super::node::topology::Topology;
use super::ops::confirm::Confirmer;
use super::ops::{apply, inspect, read, Ctx};
use super::{Applied, BatchError, Cache, CacheError, CacheOp, Fill, Guards, Probe};

/// How a [`RedisCache`] connects and bounds its calls.
pub(crate) struct Options {
    /// Bound on every call; a call that runs out bypasses the cache.
    pub timeout: Duration,
    /// Bound on forming a connection, which runs in the background (see `node/conn.rs`).
    pub connect_timeout: Duration,
    /// PEM roots to trust for `rediss://` instead of the built-in Mozilla roots.
    pub root_cert: Option<Vec<u8>>,
    /// Replicas that must hold a batch's writes before it counts as applied.
    pub confirm: Option<Confirm>,
    /// Hit `GET`s go to replicas (cluster only).
    pub read_from_replicas: bool,
    pub guards: Guards,
    /// ElastiCache IAM authentication: a token on every new connection, refreshed on it.
    pub credentials: Option<crate::iam::IamCredentials>,
    /// Idle time before TCP keepalive probes start on every connection; `None` leaves them off.
    pub tcp_keepalive: Option<Duration>,
    /// A circuit breaker per node (`node/breaker.rs`).
    pub breaker: crate::config::BreakerSettings,
    /// ElastiCache Serverless: replica reads go to its reader endpoint as it is, and positions
    /// live without a TTL (see `ops/mod.rs`).
    pub serverless: bool,
}

/// How many replicas confirm a batch, and how long that may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    pub replicas: u32,
    pub timeout: Duration,
}

/// The Redis cache: one node or a cluster, built by [`RedisCache::from_settings`], the one
/// place that knows about secrets, TLS roots and clusters. Cheap to clone.
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Ctx,
    confirmer: Confirmer,
}

impl RedisCache {
    /// A single node. Building it starts connecting in the background and never fails for a
    /// Redis that is down: the function still starts and serves from DynamoDB meanwhile.
    pub(crate) fn single(url: &str, options: Options) -> Result<Self, CacheError> {
        Self::build(url, options, false)
    }

    /// A Redis Cluster reached through `url` (the ElastiCache configuration endpoint, or any
    /// node): its slot map is asked for at once, and its nodes connected as the map names them.
    pub(crate) fn cluster(url: &str, options: Options) -> Result<Self, CacheError> {
        Self::build(url, options, true)
    }

    fn build(url: &str, options: Options, cluster: bool) -> Result<Self, CacheError> {
        let replica_reads = cluster && options.read_from_replicas;
        let serverless = options.serverless;
        let (connect, endpoint) = Connect::new(
            url,
            ConnectOptions {
                timeout: options.connect_timeout,
                root_cert: options.root_cert,
                credentials: options.credentials,
                tcp_keepalive: options.tcp_keepalive,
                readonly: replica_reads,
            },
        )?;
        let pool = Arc::new(Pool::new(connect));
        let breakers = Arc::new(Breakers::new(options.breaker));
        let topology = if cluster {
            Topology::cluster(
                endpoint,
                Arc::clone(&pool),
                Arc::clone(&breakers),
                options.timeout,
                options.connect_timeout,
                replica_reads,
                !serverless,
            )
        } else {
            Topology::single(endpoint, Arc::clone(&pool), Arc::clone(&breakers))
        };
        let caller = Caller::new(topology, pool, breakers);
        Ok(Self {
            inner: Arc::new(Inner {
                ctx: Ctx {
                    caller,
                    timeout: options.timeout,
                    connect_timeout: options.connect_timeout,
                    guards: options.guards,
                    serverless,
                },
                confirmer: Confirmer::new(options.confirm),
            }),
        })
    }

    fn ctx(&self) -> &Ctx {
        &self.inner.ctx
    }

    /// Declares this Redis empty of any earlier data of this cache: every slot's epoch becomes
    /// 0 (where none is set yet), so refreshes write from the first record on instead of
    /// deleting until a slot's epoch is newer than the records in flight. The node's eviction
    /// count is left for the first write to take (`0:?`, see `apply.lua`). Only for a Redis the
    /// caller knows it just started empty (the local stack, tests); after a deploy or a data
    /// loss, leave it to the first write of each slot, which is always safe.
    pub async fn declare_empty(&self) -> Result<(), CacheError> {
        inspect::declare_empty(self.ctx()).await
    }

    /// Waits up to `wait` for the slot map and every primary's connection: for one-shot
    /// tools, whose first call would otherwise find the connection still forming (TLS, IAM,
    /// `AUTH`) and bypass. The functions never wait so: their connections form from cold start
    /// on, and a request that comes first bypasses.
    pub async fn ready(&self, wait: std::time::Duration) -> Result<(), CacheError> {
        inspect::ready(self.ctx(), wait).await
    }

    /// A plain GET, for tools and tests that look without taking a lease.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        read::get(self.ctx(), key).await
    }

    /// Up to `n` distinct product keys (`<prefix><id>`) drawn at random from every primary.
    pub async fn sample_keys(&self, prefix: &str, n: usize) -> Result<Vec<String>, CacheError> {
        inspect::sample_keys(self.ctx(), prefix, n).await
    }

    /// Each key's value and recorded position (`{key}:ver`).
    pub async fn values(
        &self,
        keys: &[String],
    ) -> Result<Vec<(Option<String>, Option<String>)>, CacheError> {
        inspect::values(self.ctx(), keys).await
    }

    /// Deletes each key with its lease, as an invalidation does; how many held a value.
    pub async fn purge(&self, keys: &[String]) -> Result<usize, CacheError> {
        inspect::purge(self.ctx(), keys).await
    }

    /// The address (`host:port`) of the primary serving `key`, or, on a cluster whose slot map
    /// is not known yet, a name starting with `cluster`: for tests, which wait for the map
    /// before stalling a node.
    #[cfg(feature = "test-support")]
    pub fn breaker_node(&self, key: &str) -> String {
        use super::node::topology::Role;
        match self.ctx().caller.topology.router_now(Role::Primary) {
            Some(router) => router.node_of(key).to_string(),
            None => "cluster (slot map not known yet)".to_owned(),
        }
    }
}

impl Cache for RedisCache {
    async fn probe(&self, key: &str, token: &str, lease: Duration) -> Result<Probe, CacheError> {
        read::probe(self.ctx(), key, token, lease).await
    }

    async fn get_many(&self, keys: &[String]) -> Vec<Result<Option<String>, CacheError>> {
        read::get_many(self.ctx(), keys).await
    }

    async fn probe_many(
        &self,
        keys: &[String],
        token: &str,
        lease: Duration,
    ) -> Vec<Result<Probe, CacheError>> {
        read::probe_many(self.ctx(), keys, token, lease).await
    }

    fn fill(&self, fill: Fill) -> impl Future<Output = Result<bool, CacheError>> + Send + 'static {
        let this = self.clone();
        async move { read::fill(this.ctx(), &fill).await }
    }

    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), CacheError>> + Send + 'static {
        let (this, key, token) = (self.clone(), key.to_owned(), token.to_owned());
        async move { read::release(this.ctx(), &key, &token).await }
    }

    async fn apply(&self, ops: &[CacheOp]) -> Result<Applied, BatchError> {
        self.apply_after(ops, 0).await
    }

    async fn apply_after(&self, ops: &[CacheOp], ahead: usize) -> Result<Applied, BatchError> {
        apply::apply(self.ctx(), &self.inner.confirmer, ops, ahead).await
    }
}
