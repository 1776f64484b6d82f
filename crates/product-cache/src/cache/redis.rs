//! [`RedisCache`]: the [`Cache`] trait over one Redis node or a Redis Cluster, every operation
//! bounded by a timeout so that a slow or absent Redis costs a request milliseconds, never its
//! answer.

use std::future::Future;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;

use super::batch::{CHUNK, IN_FLIGHT};
use super::breaker::Breakers;
use super::connect::Connector;
use super::many::probe_of;
use super::nodes::Nodes;
use super::scripts::scripts;
use super::slots;
use super::topology::{is_dead_connection, Conn, Node};
use super::VERSION_TTL;
use super::{
    lease_key, version_key, Applied, BatchError, Cache, CacheError, CacheOp, Fill, Guards, Order,
    Probe, LEASE_KEY_TTL,
};

pub(super) fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

pub(super) fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// How a [`RedisCache`] connects and bounds its calls.
pub(crate) struct Options {
    /// Bound on every call; a call that runs out bypasses the cache.
    pub timeout: Duration,
    /// Bound on forming a connection, which runs in the background (see `connect.rs`).
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
    /// A circuit breaker per node (`breaker.rs`).
    pub breaker: crate::config::BreakerSettings,
}

/// How many replicas confirm a batch, and how long that may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    pub replicas: u32,
    pub timeout: Duration,
}

/// The Redis cache: one node or a cluster, built by [`RedisCache::from_settings`], the one
/// place that knows about secrets, TLS roots and clusters.
#[derive(Clone)]
pub struct RedisCache {
    pub(super) connector: std::sync::Arc<Connector<Conn>>,
    pub(super) timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) confirm: Option<Confirm>,
    pub(super) guards: Guards,
    /// How many replicas each node (by its address on a cluster, `None` for the single node)
    /// had attached at its last batch: the next `WAIT` asks for no more, so a shard short of
    /// replicas does not cost every batch the confirmation timeout.
    pub(super) attached: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Node, u32>>>,
    /// The configured endpoint's host and port: on a cluster, a node to ask for the slot map.
    pub(super) endpoint: (String, u16),
    /// Each node's circuit breaker, and which node a key is on (a cluster's slot map, kept).
    pub(super) breakers: std::sync::Arc<Breakers>,
    pub(super) nodes: std::sync::Arc<Nodes>,
    /// Hits go to a replica of the key's shard (cluster only).
    pub(super) read_from_replicas: bool,
}

impl RedisCache {
    /// A single node. Building it starts connecting in the background and never fails for a
    /// Redis that is down: the function still starts and serves from DynamoDB meanwhile.
    pub(crate) fn single(url: &str, options: Options) -> Result<Self, CacheError> {
        let info = redis::IntoConnectionInfo::into_connection_info(url)?;
        let endpoint = host_port(info.addr());
        let tcp = tcp_settings(info.tcp_settings().clone(), options.tcp_keepalive);
        let info = info.set_tcp_settings(tcp);
        let client = match options.root_cert.clone() {
            Some(pem) => redis::Client::build_with_tls(info, certificates(pem))?,
            None => redis::Client::open(info)?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            // No response timeout on the connection: it would apply to a whole pipeline, and a
            // large batch has a larger budget (see `apply`). Every call is bounded by its own.
            .set_response_timeout(None)
            // Reconnect attempts happen in the background; keep them few and short so a dead
            // Redis is noticed quickly and retried on later requests.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let config = match options.credentials.clone() {
            Some(credentials) => config.set_credentials_provider(credentials),
            None => config,
        };
        let connector = Connector::start(move || {
            let (client, config) = (client.clone(), config.clone());
            async move {
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map(Conn::Single)
            }
            .boxed()
        });
        let nodes = Nodes::single(&endpoint);
        Ok(Self::with(connector, &options, endpoint, nodes))
    }

    /// A Redis Cluster reached through `url` (the ElastiCache configuration endpoint). It
    /// follows MOVED/ASK redirections during resharding and failover.
    pub(crate) fn cluster(url: &str, options: Options) -> Result<Self, CacheError> {
        let endpoint = host_port(redis::IntoConnectionInfo::into_connection_info(url)?.addr());
        let mut builder = redis::cluster::ClusterClient::builder(vec![url])
            .tcp_settings(tcp_settings(
                redis::io::tcp::TcpSettings::default(),
                options.tcp_keepalive,
            ))
            .connection_timeout(options.connect_timeout)
            // The client's own bound on a request, for what it does by itself (refreshing the
            // slot map); every call of ours is bounded by `timeout` on top.
            .response_timeout(options.connect_timeout)
            .retries(2);
        if let Some(pem) = options.root_cert.clone() {
            builder = builder.certs(certificates(pem));
        }
        if options.read_from_replicas {
            // Read-only commands (a hit's `GET`) go to a replica of the key's shard; scripts
            // and writes stay on the primary.
            builder =
                builder.read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy);
        }
        if let Some(credentials) = options.credentials.clone() {
            builder = builder.set_credentials_provider(credentials);
        }
        let client = builder.build()?;
        let nodes = Nodes::cluster(&endpoint);
        let connector = Connector::start(move || {
            let client = client.clone();
            async move { client.get_async_connection().await.map(Conn::Cluster) }.boxed()
        });
        Ok(Self::with(connector, &options, endpoint, nodes))
    }

    fn with(
        connector: Connector<Conn>,
        options: &Options,
        endpoint: (String, u16),
        nodes: Nodes,
    ) -> Self {
        Self {
            connector: std::sync::Arc::new(connector),
            timeout: options.timeout,
            connect_timeout: options.connect_timeout,
            confirm: options.confirm,
            guards: options.guards,
            attached: Default::default(),
            endpoint,
            breakers: std::sync::Arc::new(Breakers::new(options.breaker)),
            nodes: std::sync::Arc::new(nodes),
            read_from_replicas: options.read_from_replicas,
        }
    }

    pub(super) async fn conn(&self) -> Result<Conn, CacheError> {
        self.connector.get(self.timeout).await
    }

    pub(super) async fn bounded<T>(
        &self,
        budget: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(budget, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CacheError::Timeout(budget)),
        }
    }
}

/// `base` with TCP keepalive probes after `idle` without traffic (and every `idle` after that):
/// a connection a middle box dropped silently while the function was idle is found dead by the
/// probes, not by a request that waits out its timeout on it.
fn tcp_settings(
    base: redis::io::tcp::TcpSettings,
    idle: Option<Duration>,
) -> redis::io::tcp::TcpSettings {
    match idle {
        Some(idle) => base.set_keepalive(
            redis::io::tcp::socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle),
        ),
        None => base,
    }
}

fn host_port(addr: &redis::ConnectionAddr) -> (String, u16) {
    match addr {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
        other => (other.to_string(), 0),
    }
}

fn certificates(root_cert: Vec<u8>) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    }
}

impl Cache for RedisCache {
    /// A hit is one plain `GET`: no script, so it costs the node what any reader's `GET` costs.
    /// Only when it finds nothing does the probe script run, which looks again and takes the
    /// lease atomically, so a fill racing an invalidation is still caught.
    async fn probe(&self, key: &str, token: &str, lease: Duration) -> Result<Probe, CacheError> {
        // Through the key's node's breaker: while it is open, no I/O at all.
        let probe = async {
            let mut conn = self.conn().await?;
            let cached: Option<String> = match self.bounded(self.timeout, conn.get(key)).await {
                Err(CacheError::Redis(e)) if is_dead_connection(&e) => {
                    self.bounded(self.timeout, conn.get(key)).await?
                }
                other => other?,
            };
            if let Some(value) = cached {
                return Ok(Probe::Hit(value));
            }
            let mut invocation = scripts().probe.key(key);
            invocation
                .key(lease_key(key))
                .arg(token)
                .arg(lease.as_millis().max(1) as u64)
                .arg(flag(self.guards.leases))
                .arg(LEASE_KEY_TTL.as_secs());
            let (tag, value): (u8, Option<String>) = self
                .bounded(self.timeout, invocation.invoke_async(&mut conn))
                .await?;
            probe_of(tag, value)
        };
        match self.guarded_trial(key, probe).await {
            // Not served: the trial's answer may be a demoted primary's (see `nodes.rs`).
            (Ok(Probe::Hit(_)), true) => Err(CacheError::BreakerOpen(self.node_of(key))),
            (outcome, _) => outcome,
        }
    }

    async fn get_many(&self, keys: &[String]) -> Vec<Result<Option<String>, CacheError>> {
        self.get_many_by_node(keys).await
    }

    async fn probe_many(
        &self,
        keys: &[String],
        token: &str,
        lease: Duration,
    ) -> Vec<Result<Probe, CacheError>> {
        self.probe_many_by_node(keys, token, lease).await
    }

    fn fill(&self, fill: Fill) -> impl Future<Output = Result<bool, CacheError>> + Send + 'static {
        let this = self.clone();
        async move {
            let write = async {
                let mut conn = this.conn().await?;
                let mut invocation = scripts().fill.key(&fill.key);
                invocation
                    .key(lease_key(&fill.key))
                    .key(version_key(&fill.key))
                    .arg(&fill.token)
                    .arg(&fill.value)
                    .arg(secs(fill.ttl))
                    .arg(fill.order.as_ref().map(Order::encode).unwrap_or_default())
                    .arg(secs(VERSION_TTL.max(fill.ttl)))
                    .arg(flag(this.guards.leases))
                    .arg(flag(this.guards.ordering));
                let written: u8 = this
                    .bounded(this.timeout, invocation.invoke_async(&mut conn))
                    .await?;
                Ok(written == 1)
            };
            this.guarded(&fill.key, write).await
        }
    }

    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), CacheError>> + Send + 'static {
        let (this, key, token) = (self.clone(), key.to_owned(), token.to_owned());
        async move {
            let release = async {
                let mut conn = this.conn().await?;
                let mut invocation = scripts().release.key(lease_key(&key));
                invocation.arg(&token);
                this.bounded(this.timeout, invocation.invoke_async::<u8>(&mut conn))
                    .await
                    .map(drop)
            };
            this.guarded(&key, release).await
        }
    }

    /// On a single node, pipelines of [`CHUNK`] ops; on a cluster, one pipeline per hash slot
    /// (a cluster pipeline cannot span slots), in flight together. The whole batch gets the
    /// per-operation timeout once per 1,000 ops, a budget that follows the work; the
    /// connection itself has no response timeout that could cut a large pipeline short.
    async fn apply(&self, ops: &[CacheOp]) -> Result<Applied, BatchError> {
        self.apply_after(ops, 0).await
    }

    async fn apply_after(&self, ops: &[CacheOp], ahead: usize) -> Result<Applied, BatchError> {
        self.apply_batch(ops, ahead).await
    }
}

impl RedisCache {
    /// Declares this Redis empty of any earlier data of this cache: every slot's epoch becomes
    /// 0 (where none is set yet), so refreshes write from the first record on instead of
    /// deleting until a slot's epoch is newer than the records in flight. The node's eviction
    /// count is left for the first write to take (`0:?`, see `apply.lua`). Only for a Redis the
    /// caller knows it just started empty (the local stack, tests); after a deploy or a data
    /// loss, leave it to the first write of each slot, which is always safe.
    pub async fn declare_empty(&self) -> Result<(), CacheError> {
        let conn = self.conn().await?;
        let keys: Vec<String> = (0..slots::SLOTS).map(slots::epoch_key_of_slot).collect();
        // One pipeline on a single node; on a cluster, one per slot, since that is how the
        // client routes pipelines.
        let groups: Vec<&[String]> = match conn {
            Conn::Single(_) => vec![&keys[..]],
            Conn::Cluster(_) => keys.chunks(1).collect(),
        };
        // A timeout per round of requests: a single node's chunks, or a cluster's 16,384
        // pipelines `IN_FLIGHT` at a time (at the default 100 ms timeout, 1.7 s for all of them
        // was too little on a loaded 2-core machine).
        let rounds = (keys.len() / CHUNK).max(groups.len() / IN_FLIGHT) + 1;
        let budget = self.timeout * rounds as u32;
        let sent = futures::stream::iter(groups)
            .map(|group| {
                let mut conn = conn.clone();
                async move {
                    let mut pipe = redis::pipe();
                    for key in group {
                        pipe.set_options(
                            key,
                            "0:?",
                            redis::SetOptions::default().conditional_set(redis::ExistenceCheck::NX),
                        )
                        .ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<_>>();
        for result in self.bounded(budget, async { Ok(sent.await) }).await? {
            result?;
        }
        Ok(())
    }

    /// A plain GET, for tools and tests that look without taking a lease.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut conn = self.conn().await?;
        self.bounded(self.timeout, conn.get(key)).await
    }
}
