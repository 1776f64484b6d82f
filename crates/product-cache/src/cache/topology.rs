//! Where a call goes: the connection to one node or a cluster, a pipeline sent to one node
//! by address, the cluster's slot map (`CLUSTER SLOTS`, read as redis-rs reads it), and which
//! errors mean a dead connection worth one retry.

use redis::aio::ConnectionManager;

use super::redis::RedisCache;
use super::CacheError;

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

/// A node a pipeline goes to: a primary's address on a cluster, `None` for the single node.
pub(super) type Node = Option<(String, u16)>;

/// The primaries' addresses by slot range: first and last slot, host and port.
pub(super) type SlotMap = Vec<(u16, u16, (String, u16))>;

impl RedisCache {
    /// The primaries' addresses by slot range, as the cluster reports them (`CLUSTER SLOTS`).
    /// Asked of a node whose address is known (the first primary of the map kept, else the
    /// configured endpoint, else any node), since an endpoint reported as NULL or "" means the
    /// node that answered (see [`parse_slot_map`]).
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
        let known = self.nodes.first_primary();
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
        parse_slot_map(&reply, &host)
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

/// Sends a pipeline of idempotent commands, once more on a connection found dead (the server
/// restarted or closed it while this process was idle or frozen); any error reply fails it.
pub(super) async fn send_idempotent(
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
pub(super) fn is_dead_connection(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error()
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
}
