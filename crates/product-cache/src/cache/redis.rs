//! [`RedisCache`]: the [`Cache`] trait over one Redis node or a Redis Cluster, every operation
//! bounded by a timeout so that a slow or absent Redis costs a request milliseconds, never its
//! answer.

use std::future::Future;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;

use super::breaker::Breakers;
use super::connect::Connector;
use super::deletes;
use super::nodes::Nodes;
use super::scripts::scripts;
use super::slots::{self, slot_of};
use super::VERSION_TTL;
use super::{
    epoch_key, lease_key, staged_key, version_key, Applied, BatchError, Cache, CacheError, CacheOp,
    Fill, Guards, OpKind, Order, Probe, UnderReplicated,
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
pub(super) enum Conn {
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
    connector: std::sync::Arc<Connector<Conn>>,
    pub(super) timeout: Duration,
    connect_timeout: Duration,
    confirm: Option<Confirm>,
    guards: Guards,
    /// How many replicas each node (by its address on a cluster, `None` for the single node)
    /// had attached at its last batch: the next `WAIT` asks for no more, so a shard short of
    /// replicas does not cost every batch the confirmation timeout.
    attached: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Node, u32>>>,
    /// The configured endpoint's host and port: the single node, named in reports; on a
    /// cluster, a node to ask for the slot map.
    endpoint: (String, u16),
    /// A primary of the last slot map, to ask for the next (see `slot_map`).
    last_primary: std::sync::Arc<std::sync::Mutex<Option<(String, u16)>>>,
    /// Each node's circuit breaker, and which node a key is on (a cluster's slot map, kept).
    pub(super) breakers: std::sync::Arc<Breakers>,
    pub(super) nodes: std::sync::Arc<Nodes>,
}

/// A node a pipeline goes to: a primary's address on a cluster, `None` for the single node.
type Node = Option<(String, u16)>;

/// The primaries' addresses by slot range: first and last slot, host and port.
pub(super) type SlotMap = Vec<(u16, u16, (String, u16))>;

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
        let nodes = Nodes::single(&client.get_connection_info().addr().to_string());
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
        let nodes = Nodes::cluster(
            &redis::IntoConnectionInfo::into_connection_info(url)?
                .addr()
                .to_string(),
        );
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
            last_primary: Default::default(),
            breakers: std::sync::Arc::new(Breakers::new(options.breaker)),
            nodes: std::sync::Arc::new(nodes),
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

    /// One call of the apply script for `ops[group]` (see `apply.lua` for the layout), with
    /// the `SET`s staging its new documents first (`batch` names the staged keys).
    fn apply_invocation<'a>(
        &self,
        pipe: &mut redis::Pipeline,
        script: &'a redis::Script,
        ops: &[CacheOp],
        group: &[usize],
        now_ms: u64,
        batch: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .arg(flag(self.guards.ordering))
            .arg(now_ms)
            .arg(VERSION_TTL.as_secs());
        for op in group.iter().map(|&i| &ops[i]) {
            let (kind, ttl) = match &op.kind {
                OpKind::Delete => ("del", Duration::ZERO),
                OpKind::Set { ttl, .. } => ("set", *ttl),
            };
            invocation
                .key(&op.key)
                .key(lease_key(&op.key))
                .key(version_key(&op.key))
                .key(epoch_key(&op.key))
                .arg(kind)
                .arg(secs(ttl))
                .arg(op.order.as_ref().map(Order::encode).unwrap_or_default())
                .arg(op.created_ms.map(|c| c.to_string()).unwrap_or_default())
                .arg(flag(op.delete_if_refused));
        }
        for op in group.iter().map(|&i| &ops[i]) {
            if let OpKind::Set { value, ttl } = &op.kind {
                let staged = staged_key(&op.key, batch);
                // Its TTL is the document's: RENAME carries it over, and a document whose
                // script never ran (the pipeline was cut) does not outlive it.
                pipe.cmd("SET")
                    .arg(&staged)
                    .arg(value)
                    .arg("EX")
                    .arg(secs(*ttl));
                invocation.key(staged);
            }
        }
        invocation
    }

    /// One pipeline to one node: a script call per hash slot of `group` (a script's keys must
    /// share a slot), each after the `SET`s that stage its new documents, then, when replicas
    /// must confirm, `WAIT` on the same connection, since it waits for that connection's writes
    /// and no other's. Sent optimistically as EVALSHAs; a node that does not know the script
    /// (restarted, failed over, new) answers NOSCRIPT, and the pipeline goes again with the
    /// script loaded first. Every op is idempotent, so repeating the ones that did land changes
    /// nothing.
    async fn apply_group(
        &self,
        conn: Conn,
        ops: &[CacheOp],
        group: &Group,
        now_ms: u64,
        batch: &str,
    ) -> Result<(Vec<usize>, Option<UnderReplicated>), CacheError> {
        let script = &scripts().apply;
        let asked = self.to_ask(&group.node, group.fenced);
        let pipeline = |load: bool| {
            let mut pipe = redis::pipe();
            if load {
                pipe.load_script(script);
            }
            for slot in &group.slots {
                let invocation = self.apply_invocation(&mut pipe, script, ops, slot, now_ms, batch);
                pipe.invoke_script(&invocation);
            }
            self.ask_confirmation(&mut pipe, asked);
            pipe
        };
        let send = |pipe: redis::Pipeline| {
            let mut conn = conn.clone();
            let node = group.node.clone();
            async move {
                to_node(&mut conn, pipe, node)
                    .await?
                    .into_iter()
                    .map(redis::Value::extract_error)
                    .collect::<redis::RedisResult<Vec<_>>>()
            }
        };
        let replies = match send(pipeline(false)).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                send(pipeline(true)).await
            }
            // The connection was dead (the server restarted or closed it while this process
            // was idle or frozen); the client has reconnected meanwhile. Once more, loaded,
            // since a restarted server has no scripts either.
            Err(e) if is_dead_connection(&e) => send(pipeline(true)).await,
            other => other,
        }?;
        let short = self
            .confirmed(
                &mut conn.clone(),
                &group.node,
                asked,
                group.fenced,
                &replies,
            )
            .await?;
        drop(conn);
        // The script calls' replies are the arrays (the staging SETs, SCRIPT LOAD and WAIT
        // answer otherwise), one per slot in order: the refused changes' indexes in it.
        let mut refused = Vec::new();
        let calls = replies.iter().filter_map(|r| match r {
            redis::Value::Array(items) => Some(items),
            _ => None,
        });
        for (slot, items) in group.slots.iter().zip(calls) {
            for item in items {
                match item {
                    redis::Value::Int(j) => refused.extend(slot.get(*j as usize).copied()),
                    other => {
                        return Err(CacheError::Unexpected(format!(
                            "the apply script replied {other:?}"
                        )))
                    }
                }
            }
        }
        Ok((refused, short))
    }

    /// How many replicas the `WAIT` of a pipeline to `node` asks for: the configured number,
    /// or fewer when the node had fewer attached at its last batch. `None` when nothing is
    /// confirmed.
    fn to_ask(&self, node: &Node, fenced: bool) -> Option<u32> {
        let confirm = self.confirm?;
        if fenced {
            return Some(confirm.replicas);
        }
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            attached
                .get(node)
                .map_or(confirm.replicas, |&n| n.min(confirm.replicas)),
        )
    }

    /// Ends a pipeline with `INFO replication` (which replicas are attached now, after its
    /// writes) and `WAIT` for `asked` of them, on the same connection, since `WAIT` waits for
    /// that connection's writes and no other's.
    fn ask_confirmation(&self, pipe: &mut redis::Pipeline, asked: Option<u32>) {
        if let (Some(confirm), Some(asked)) = (self.confirm, asked) {
            pipe.cmd("INFO").arg("replication");
            pipe.cmd("WAIT")
                .arg(asked)
                .arg(confirm.timeout.as_millis() as u64);
        }
    }

    /// Whether the `INFO replication` and `WAIT` ending a pipeline's `replies` (when replicas
    /// must confirm) say its writes are held by every replica attached to `node`, up to the
    /// configured number: a replica still syncing (or not there at all, the shard after a
    /// failover) cannot acknowledge and must not stall the stream, while one attached that does
    /// not acknowledge in time (stalled, cut off) fails the batch. A `WAIT` that asked for fewer
    /// than are attached now (a replica came back) goes once more, on the same connection.
    /// `Some` when fewer than configured were attached. A `fenced` pipeline (its node's breaker
    /// trial) needs every replica configured.
    async fn confirmed(
        &self,
        conn: &mut Conn,
        node: &Node,
        asked: Option<u32>,
        fenced: bool,
        replies: &[redis::Value],
    ) -> Result<Option<UnderReplicated>, CacheError> {
        let (Some(confirm), Some(asked)) = (self.confirm, asked) else {
            return Ok(None);
        };
        let [.., info, wait] = replies else {
            return Err(CacheError::Unexpected(format!(
                "no INFO and WAIT replies in {replies:?}"
            )));
        };
        let online = online_replicas(info)?;
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), online);
        let required = if fenced {
            confirm.replicas
        } else {
            confirm.replicas.min(online)
        };
        let mut acked = wait_reply(wait)?;
        if acked < i64::from(required) && asked < required {
            let mut pipe = redis::pipe();
            pipe.cmd("WAIT")
                .arg(required)
                .arg(confirm.timeout.as_millis() as u64);
            let replies = to_node(conn, pipe, node.clone()).await?;
            acked = wait_reply(replies.last().unwrap_or(&redis::Value::Nil))?;
        }
        if acked < i64::from(required) {
            return Err(CacheError::Unconfirmed {
                acked,
                wanted: required,
                within: confirm.timeout,
            });
        }
        Ok((required < confirm.replicas).then(|| UnderReplicated {
            node: match node {
                Some((host, port)) => format!("{host}:{port}"),
                None => format!("{}:{}", self.endpoint.0, self.endpoint.1),
            },
            online,
            wanted: confirm.replicas,
        }))
    }

    /// A single node's batch of deletes, without the script (see `deletes.rs` for why that is
    /// as safe): every group's positions read, then every group's deletes and newer positions
    /// written, the second pipelines ending with `WAIT` when replicas must confirm. All first
    /// pipelines go out together and all second ones once every first has its reply: two
    /// round trips for the batch, where a group going on by itself as its reply arrived would
    /// start a round trip of its own. One outcome per group, each bounded by `deadline`.
    async fn apply_deletes(
        &self,
        conn: &Conn,
        ops: &[CacheOp],
        groups: &[Group],
        deadline: tokio::time::Instant,
        budget: Duration,
    ) -> Vec<Result<(Vec<usize>, Option<UnderReplicated>), CacheError>> {
        let bounded = |fut| async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(r) => r,
                Err(_) => Err(CacheError::Timeout(budget)),
            }
        };
        let reads = futures::future::join_all(groups.iter().map(|group| {
            let mut conn = conn.clone();
            bounded(async move {
                let (mget, read) =
                    deletes::read_positions(ops, &group.slots[0], self.guards.ordering);
                let Some(mget) = mget else {
                    return Ok((read, Vec::new()));
                };
                let mut pipe = redis::pipe();
                pipe.add_command(mget);
                let mut replies = send_idempotent(&mut conn, &pipe).await?;
                let reply = replies.pop().ok_or_else(|| {
                    CacheError::Unexpected("no reply to the MGET of positions".into())
                })?;
                let positions = redis::from_redis_value(reply)
                    .map_err(|e| CacheError::Unexpected(format!("MGET of positions: {e}")))?;
                Ok((read, positions))
            })
        }))
        .await;
        futures::future::join_all(groups.iter().zip(reads).map(|(group, read)| {
            let mut conn = conn.clone();
            async move {
                let (read, positions) = read?;
                let (mut pipe, refused) = deletes::write(ops, &group.slots[0], &read, positions);
                let asked = self.to_ask(&None, group.fenced);
                self.ask_confirmation(&mut pipe, asked);
                if pipe.is_empty() {
                    return Ok((refused, None));
                }
                let confirmed = async {
                    let replies = send_idempotent(&mut conn, &pipe).await?;
                    self.confirmed(&mut conn, &None, asked, group.fenced, &replies)
                        .await
                };
                let short = tokio::time::timeout_at(deadline, confirmed)
                    .await
                    .map_err(|_| CacheError::Timeout(budget))??;
                Ok((refused, short))
            }
        }))
        .await
    }

    /// The primaries' addresses by slot range, as the cluster reports them (`CLUSTER SLOTS`).
    /// Asked of a node whose address is known (a primary of the last map, else the configured
    /// endpoint, else any node), since an endpoint reported as NULL or "" means the node that
    /// answered (see [`parse_slot_map`]).
    pub(super) async fn slot_map(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) -> Result<SlotMap, CacheError> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let slots = |route: SingleNodeRoutingInfo| {
            let mut conn = conn.clone();
            async move {
                conn.route_command(
                    redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                    RoutingInfo::SingleNode(route),
                )
                .await
            }
        };
        let known = self
            .last_primary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut answered = None;
        for (host, port) in known.into_iter().chain([self.endpoint.clone()]) {
            let route = SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port,
            };
            // A node the client has no connection to (the configuration endpoint's name is not
            // one of the nodes'), or one gone since, is passed over.
            if let Ok(reply) = self.bounded(self.timeout, slots(route)).await {
                answered = Some((reply, host));
                break;
            }
        }
        let (reply, host) = match answered {
            Some(answered) => answered,
            None => {
                // Any node; an endpoint it reports as NULL then resolves to the configured
                // endpoint's host, as the client itself resolves it for the node it asked.
                let random = || slots(SingleNodeRoutingInfo::Random);
                // Once more on a dead connection (a thawed environment), as any idempotent read.
                let reply = match self.bounded(self.timeout, random()).await {
                    Err(CacheError::Redis(e)) if is_dead_connection(&e) => {
                        self.bounded(self.timeout, random()).await?
                    }
                    other => other?,
                };
                (reply, self.endpoint.0.clone())
            }
        };
        let map = parse_slot_map(&reply, &host)?;
        *self.last_primary.lock().unwrap_or_else(|e| e.into_inner()) =
            map.first().map(|(_, _, node)| node.clone());
        Ok(map)
    }
}

/// The primaries by slot range of a `CLUSTER SLOTS` reply from a node whose host is
/// `answering`. As redis-rs reads it (`cluster_handling/topology.rs`), and as the command's
/// documentation says: a NULL or empty host (what `cluster-preferred-endpoint-type
/// unknown-endpoint` reports), or a wildcard one (`0.0.0.0`, `::`), is the answering node's
/// host, with the port reported; `?` is a node whose endpoint is unknown, and a range whose
/// primary is unknown is left out (its ops go without a node address, as for slots not in
/// the map).
pub(super) fn parse_slot_map(reply: &redis::Value, answering: &str) -> Result<SlotMap, CacheError> {
    let unexpected = || CacheError::Unexpected(format!("CLUSTER SLOTS replied {reply:?}"));
    let redis::Value::Array(ranges) = reply else {
        return Err(unexpected());
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            return Err(unexpected());
        };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
            (fields.first(), fields.get(1))
        else {
            return Err(unexpected());
        };
        let Some(redis::Value::Array(primary)) = fields.get(2) else {
            return Err(unexpected());
        };
        let host = match primary.first() {
            Some(redis::Value::Nil) => answering.to_owned(),
            Some(h) => {
                let host: String = redis::from_redis_value(h.clone()).map_err(|_| unexpected())?;
                match host.as_str() {
                    "" | "0.0.0.0" | "::" => answering.to_owned(),
                    "?" => continue,
                    _ => host,
                }
            }
            None => return Err(unexpected()),
        };
        let Some(redis::Value::Int(port)) = primary.get(1) else {
            return Err(unexpected());
        };
        map.push((*start as u16, *end as u16, (host, *port as u16)));
    }
    Ok(map)
}

/// The ops one pipeline carries: the node it goes to (on a cluster), and its ops by slot.
struct Group {
    node: Option<(String, u16)>,
    slots: Vec<Vec<usize>>,
    /// Its node's breaker trial: confirmed by every replica configured, or not at all (see
    /// fencing in `nodes.rs`).
    fenced: bool,
}

impl Group {
    fn ops(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots.iter().flatten().copied()
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

/// Sends `pipe` to one node: `node` on a cluster (a primary's address from `CLUSTER SLOTS`,
/// so that a `WAIT` at its end follows its writes), the one node otherwise. Error replies stay
/// in the result. Owned, since the cluster client takes the pipeline so: a batch's pipeline
/// holds its documents, megabytes not worth a copy.
pub(super) async fn to_node(
    conn: &mut Conn,
    pipe: redis::Pipeline,
    node: Option<(String, u16)>,
) -> redis::RedisResult<Vec<redis::Value>> {
    let count = pipe.len();
    match (conn, node) {
        (Conn::Cluster(c), Some((host, port))) => {
            let route = redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port };
            c.route_pipeline(pipe, 0, count, route).await
        }
        (conn, _) => {
            use redis::aio::ConnectionLike as _;
            conn.req_packed_commands(&pipe, 0, count).await
        }
    }
}

/// The replicas `INFO replication` lists as `state=online`: attached and streaming, so able to
/// acknowledge a `WAIT`. One still loading its full sync (`wait_bgsave`, `send_bulk`) cannot.
fn online_replicas(info: &redis::Value) -> Result<u32, CacheError> {
    let text: String = redis::from_redis_value(info.clone())
        .map_err(|e| CacheError::Unexpected(format!("INFO replication: {e}")))?;
    Ok(text
        .lines()
        .filter(|line| {
            line.strip_prefix("slave")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                && line.split([':', ',']).any(|field| field == "state=online")
        })
        .count() as u32)
}

fn wait_reply(reply: &redis::Value) -> Result<i64, CacheError> {
    match reply {
        redis::Value::Int(n) => Ok(*n),
        other => Err(CacheError::Unexpected(format!("WAIT replied {other:?}"))),
    }
}

/// Sends a pipeline of idempotent commands, once more on a connection found dead (the server
/// restarted or closed it while this process was idle or frozen); any error reply fails it.
async fn send_idempotent(
    conn: &mut Conn,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<Vec<redis::Value>> {
    use redis::aio::ConnectionLike as _;
    let sent = match conn.req_packed_commands(pipe, 0, pipe.len()).await {
        Err(e) if is_dead_connection(&e) => conn.req_packed_commands(pipe, 0, pipe.len()).await,
        other => other,
    }?;
    sent.into_iter()
        .map(redis::Value::extract_error)
        .collect::<redis::RedisResult<Vec<_>>>()
}

/// An error that says the connection was lost before or while the request went out, as opposed
/// to one the server answered or a timeout. Worth one retry for an idempotent request.
fn is_dead_connection(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error()
}

/// Ops per pipeline on a single node: bounds one request's size, and what a failure of it
/// leaves unknown.
const CHUNK: usize = 1000;

/// How late a server may end a `WAIT` past its timeout: blocked clients' timeouts are checked
/// on the server's timer, every 100 ms at the default `hz` of 10.
const WAIT_TICK: Duration = Duration::from_millis(100);

/// How many groups of a batch are in flight at once.
const IN_FLIGHT: usize = 64;

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
        };
        match self.guarded_trial(key, probe).await {
            // Not served: the trial's answer may be a demoted primary's (see `nodes.rs`).
            (Ok(Probe::Hit(_)), true) => Err(CacheError::BreakerOpen(self.breaker_node(key))),
            (outcome, _) => outcome,
        }
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
        if ops.is_empty() {
            return Ok(Applied::default());
        }
        let budget = self.timeout * ((ahead + ops.len()) / CHUNK + 1) as u32;
        // A batch waits for a connection still forming (a cold start) up to the connect budget:
        // failing it would only have Lambda deliver it again later. A read bypasses instead.
        let conn = self
            .connector
            .get(budget.max(self.connect_timeout))
            .await
            .map_err(|e| BatchError::all(ops.len(), e))?;
        let groups: Vec<Group> = match &conn {
            Conn::Single(_) => (0..ops.len())
                .collect::<Vec<_>>()
                .chunks(CHUNK)
                .map(|chunk| Group {
                    node: None,
                    slots: vec![chunk.to_vec()],
                    fenced: false,
                })
                .collect(),
            Conn::Cluster(cluster) => {
                // One pipeline per primary, so its `WAIT` follows its writes on one connection.
                let map = match self.batch_slot_map(&mut cluster.clone()).await {
                    Ok(map) => map,
                    Err(e) => return Err(BatchError::all(ops.len(), e)),
                };
                let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
                for (i, op) in ops.iter().enumerate() {
                    by_slot.entry(slot_of(&op.key)).or_default().push(i);
                }
                let mut by_node: std::collections::BTreeMap<
                    Option<(String, u16)>,
                    Vec<Vec<usize>>,
                > = Default::default();
                for (slot, group) in by_slot {
                    let node = map
                        .iter()
                        .find(|(start, end, _)| (*start..=*end).contains(&slot))
                        .map(|(_, _, node)| node.clone());
                    by_node.entry(node).or_default().push(group);
                }
                by_node
                    .into_iter()
                    .map(|(node, slots)| Group {
                        node,
                        slots,
                        fenced: false,
                    })
                    .collect()
            }
        };
        // Each node through its breaker: the groups for a node whose breaker is open fail now,
        // unsent, and every other node's go ahead.
        let mut permits = self.batch_permits();
        let (mut groups, unsent): (Vec<Group>, Vec<Group>) = groups
            .into_iter()
            .partition(|g| permits.admit(&self.group_node(g.node.as_ref())));
        for group in &mut groups {
            group.fenced = permits.is_trial(&self.group_node(group.node.as_ref()));
        }
        let unsent = unsent.into_iter().map(|g| {
            let node = self.group_node(g.node.as_ref());
            (g, Err(CacheError::BreakerOpen(node)))
        });
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let batch = format!("{:016x}", fastrand::u64(..));
        // Up to two `WAIT`s (a second when a replica came back, see `confirmed`), each of which
        // a server may end up to one of its timer ticks (100 ms at the default `hz` 10) late.
        // A batch cut short here would never learn how many replicas its node has attached.
        let confirming = self
            .confirm
            .map_or(Duration::ZERO, |c| 2 * (c.timeout + WAIT_TICK));
        let deadline = tokio::time::Instant::now() + budget + confirming;
        // A single node's deletes go without the script (`deletes.rs`).
        let scriptless = matches!(conn, Conn::Single(_))
            && groups
                .iter()
                .all(|g| g.slots.iter().all(|s| deletes::scriptless(ops, s)));
        type Outcome = Result<(Vec<usize>, Option<UnderReplicated>), CacheError>;
        let outcomes: Vec<(Group, Outcome)> = if scriptless {
            let outcomes = self
                .apply_deletes(&conn, ops, &groups, deadline, budget + confirming)
                .await;
            groups.into_iter().zip(outcomes).collect()
        } else {
            futures::stream::iter(groups)
                .map(|group| {
                    let (conn, batch) = (conn.clone(), &batch);
                    async move {
                        let sent = self.apply_group(conn, ops, &group, now_ms, batch);
                        let outcome = match tokio::time::timeout_at(deadline, sent).await {
                            Ok(r) => r,
                            Err(_) => Err(CacheError::Timeout(budget + confirming)),
                        };
                        (group, outcome)
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await
        };
        let mut failed = Vec::new();
        let mut refused = Vec::new();
        let mut under_replicated: Vec<UnderReplicated> = Vec::new();
        let mut first_error = None;
        for (group, outcome) in outcomes.into_iter().chain(unsent) {
            permits.note(&self.group_node(group.node.as_ref()), &outcome);
            match outcome {
                Ok((r, short)) => {
                    refused.extend(r);
                    // Once per node: a single node's chunks, or a node of several pipelines.
                    if let Some(short) = short {
                        match under_replicated.iter_mut().find(|u| u.node == short.node) {
                            Some(known) => known.online = known.online.min(short.online),
                            None => under_replicated.push(short),
                        }
                    }
                }
                Err(e) => {
                    // Not applied, or applied on a primary that no replica confirmed: a
                    // failover could still lose it, so it counts as not applied and Lambda
                    // retries it.
                    failed.extend(group.ops());
                    first_error.get_or_insert(e);
                }
            }
        }
        self.finish_batch(permits);
        match first_error {
            None => {
                refused.sort_unstable();
                Ok(Applied {
                    refused,
                    under_replicated,
                })
            }
            Some(source) => {
                failed.sort_unstable();
                Err(BatchError { failed, source })
            }
        }
    }
}

impl RedisCache {
    /// Declares this Redis empty of any earlier data of this cache: every slot's epoch becomes
    /// 0 (where none is set yet), so refreshes write from the first record on instead of
    /// deleting until a slot's epoch is newer than the records in flight. Only for a Redis the
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
        let budget = self.timeout * (keys.len() / CHUNK + 1) as u32;
        let sent = futures::stream::iter(groups)
            .map(|group| {
                let mut conn = conn.clone();
                async move {
                    let mut pipe = redis::pipe();
                    for key in group {
                        pipe.set_options(
                            key,
                            0,
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

#[cfg(test)]
mod tests {
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn range(start: i64, end: i64, host: Value, port: i64) -> Value {
        let replica = Value::Array(vec![bulk("10.0.0.9"), Value::Int(7001), bulk("id2")]);
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![host, Value::Int(port), bulk("id1")]),
            replica,
        ])
    }

    #[test]
    fn a_slot_map_resolves_endpoints_as_redis_rs_does() {
        let reply = Value::Array(vec![
            range(0, 5460, bulk("10.0.0.1"), 7000),
            range(5461, 10922, Value::Nil, 7002),
            range(10923, 16000, bulk(""), 7004),
            range(16001, 16100, bulk("0.0.0.0"), 7006),
            range(16101, 16383, bulk("?"), 7008),
        ]);
        let map = super::parse_slot_map(&reply, "node-a.example").unwrap();
        let at = |host: &str, port| (host.to_owned(), port);
        assert_eq!(
            map,
            vec![
                (0, 5460, at("10.0.0.1", 7000)),
                (5461, 10922, at("node-a.example", 7002)),
                (10923, 16000, at("node-a.example", 7004)),
                (16001, 16100, at("node-a.example", 7006)),
                // "?": unknown, left out rather than taken literally.
            ]
        );
        assert!(super::parse_slot_map(&bulk("ERR"), "h").is_err());
    }

    #[test]
    fn only_online_replicas_count() {
        let info = bulk(
            "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
             slave0:ip=10.0.0.2,port=6379,state=online,offset=100,lag=0\r\n\
             slave1:ip=10.0.0.3,port=6379,state=wait_bgsave,offset=0,lag=0\r\n\
             slave2:ip=10.0.0.4,port=6379,state=online,offset=90,lag=1\r\n\
             master_failover_state:no-failover\r\nslave_read_only:1\r\n",
        );
        assert_eq!(super::online_replicas(&info).unwrap(), 2);
        let none = bulk("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n");
        assert_eq!(super::online_replicas(&none).unwrap(), 0);
    }
}
