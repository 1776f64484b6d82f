//! The lower two layers of the Redis side: which node a call goes to, and the one way a call
//! reaches it. Nothing here knows what a product, a lease or a batch is.
//!
//! - `slot_map.rs`: what the cluster says of itself: `CLUSTER SLOTS` (the primaries and
//!   replicas of each slot range) and `INFO replication` (which replicas a primary has attached),
//!   parsed. Pure functions.
//! - `conn.rs`: one connection per node, formed in the background and formed again once found
//!   dead; TLS, AUTH or IAM, keepalive and `READONLY` the same for every node.
//! - `breaker.rs`: a circuit breaker per node.
//! - `topology.rs` (layer 1): the one node, or a cluster's slot map with each shard's attached
//!   replicas; when it is fetched again, and from which node.
//! - `call.rs` (layer 2): a pipeline sent to one node through that node's breaker, with the
//!   single retry rule every operation shares.
//!
//! The cluster client of redis-rs is not used: it keeps a slot map of its own that it does not
//! share, retries and follows redirections by itself, and treats a timeout as "ask the same node
//! again", so a node that stalled kept its slots until it answered. Owning the connections lets
//! one place decide where a call goes and what is sent twice.

pub(crate) mod breaker;
pub(crate) mod call;
pub(crate) mod conn;
pub(crate) mod slot_map;
pub(crate) mod topology;

/// A node's address, as the configured URL or the cluster (`CLUSTER SLOTS`) names it: a host
/// name where the cluster reports one (ElastiCache with TLS does, and the certificates name it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl Addr {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}
