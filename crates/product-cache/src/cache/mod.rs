//! The Redis side: lease-guarded reads and fills, ordered invalidations in pipelined batches, each
//! bounded by a timeout so that a slow or absent Redis costs a request milliseconds, never its
//! answer.
//!
//! # Keys of one product
//! - `product:42`: the plain JSON document (or `null` for "not found"), what any reader sees.
//! - `{product:42}:lease`: the token of the one reader allowed to fill the key (Facebook
//!   memcache's leases), with its expiry. Any invalidation deletes it, so a fill that raced an
//!   invalidation fails. Its key outlives the others (`LEASE_KEY_TTL`), so a full node evicts
//!   it last.
//! - `{product:42}:ver`: the newest [`Order`] applied to the key. An older or repeated record is
//!   refused, and after a REMOVE it is the tombstone that keeps an older refresh out.
//! - `product-cache:epoch:{<tag>}`, one per hash slot in use: since when this slot's positions
//!   are complete, and the node's eviction count then. It vanishes with the data (restart,
//!   `FLUSHALL`, a replica promoted empty) and is set anew when the node has evicted keys since
//!   (positions among them, perhaps), so a refresh from a record older than it becomes a
//!   delete: it may be a replay of a change whose newer successor was forgotten.
//!
//! The braces make the side keys hash like `product:42` itself, so each script touches a single
//! Redis Cluster slot.
//!
//! # Layout
//! Four layers, each using only the ones below it:
//! 1. `node/topology.rs`: which node serves a key (the one node, or a cluster's slot map and
//!    which replicas may serve reads), and when that view is fetched again;
//! 2. `node/call.rs`: a pipeline sent to one node through that node's breaker
//!    (`node/breaker.rs`) on its connection (`node/conn.rs`), with the one retry rule every
//!    operation shares;
//! 3. `ops/`: the operations (get, get many, probe, probe many, fill, release, apply a batch,
//!    confirm it, inspect), each a short composition of 1 and 2, and the Lua scripts;
//! 4. `redis.rs`: [`RedisCache`], a facade implementing [`Cache`] over them.
//!
//! Beside them: this file (the values that cross the [`Cache`] trait, and the key names),
//! `slots.rs` (Redis Cluster hash slots, and the epoch key of each) and `memory.rs` (feature
//! `test-support`: an in-memory [`Cache`] with the scripts' semantics).

use std::future::Future;
use std::time::Duration;

#[cfg(any(test, feature = "test-support"))]
pub mod memory;
mod node;
mod ops;
mod redis;
pub mod slots;

pub use self::redis::Confirm;
pub(crate) use self::redis::Options;
pub use self::redis::RedisCache;

/// The value cached under a product's key when the table has no such item. A JSON document is
/// always an object, so `null` cannot be mistaken for one, and a foreign reader doing
/// `JSON.parse` gets `null`, which every such reader already treats as "no product".
pub const NOT_FOUND: &str = "null";

/// What a position counts: stream records or item versions. Positions of different kinds cannot
/// be compared (a 20-digit sequence number says nothing about version `8`), so they carry their
/// kind into Redis, and a script that meets the other kind treats the position as unknown: an
/// invalidation deletes, a fill is guarded by its lease alone. That is what makes turning a
/// version attribute on or off on a running system, or a rollout during which the two
/// functions disagree, safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// A stream record's `SequenceNumber`.
    Sequence,
    /// The item's version attribute (`VERSION_ATTRIBUTE`).
    Version,
}

/// A position in an item's history. `major` is a non-negative integer in decimal without leading
/// zeros (compared by length, then digit by digit, so 40-digit sequence numbers compare
/// exactly); `minor` orders a REMOVE after the write that carried the same version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    kind: OrderKind,
    major: String,
    minor: u8,
}

/// Only positions of one kind compare.
impl PartialOrd for Order {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (self.kind == other.kind).then(|| {
            (self.major.len(), &self.major, self.minor).cmp(&(
                other.major.len(),
                &other.major,
                other.minor,
            ))
        })
    }
}

impl Order {
    /// A stream record's position; `None` unless `sequence_number` is a plain non-negative
    /// integer.
    pub fn sequence(sequence_number: &str) -> Option<Self> {
        Self::new(OrderKind::Sequence, sequence_number, 0)
    }

    /// An item version's position; `removed` ranks a REMOVE just after the write of the version
    /// it removes. `None` unless `version` is a plain non-negative integer.
    pub fn version(version: &str, removed: bool) -> Option<Self> {
        Self::new(OrderKind::Version, version, u8::from(removed))
    }

    fn new(kind: OrderKind, major: &str, minor: u8) -> Option<Self> {
        // At most 99 digits, for the two-digit length of the encoding (sequence numbers have
        // up to 40).
        let canonical = !major.is_empty()
            && major.len() < 100
            && minor < 10
            && major.bytes().all(|b| b.is_ascii_digit())
            && (major == "0" || !major.starts_with('0'));
        canonical.then(|| Self {
            kind,
            major: major.to_owned(),
            minor,
        })
    }

    pub fn kind(&self) -> OrderKind {
        self.kind
    }

    /// A position as Redis holds it (`{key}:ver`, see [`Order::encode`]); `None` for anything
    /// else.
    pub fn decode(encoded: &str) -> Option<Self> {
        let (kind, rest) = match encoded.as_bytes().first()? {
            b'S' => (OrderKind::Sequence, &encoded[1..]),
            b'V' => (OrderKind::Version, &encoded[1..]),
            _ => return None,
        };
        let mut parts = rest.split(':');
        let (len, major, minor) = (parts.next()?, parts.next()?, parts.next()?);
        let minor = minor.parse().ok()?;
        (parts.next().is_none() && len.parse::<usize>().ok()? == major.len())
            .then(|| Self::new(kind, major, minor))?
    }

    /// `S<len>:<major>:<minor>` or `V<len>:<major>:<minor>`, the length of `major` in two
    /// digits: positions of one kind then compare as plain strings (`newer.lua`).
    fn encode(&self) -> String {
        let kind = match self.kind {
            OrderKind::Sequence => 'S',
            OrderKind::Version => 'V',
        };
        format!(
            "{kind}{:02}:{}:{}",
            self.major.len(),
            self.major,
            self.minor
        )
    }
}

/// One change to the cache, produced by the invalidator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOp {
    pub key: String,
    pub kind: OpKind,
    /// Applied only if newer than what the key has seen; `None` applies unconditionally (only
    /// ever a delete, which is always safe).
    pub order: Option<Order>,
    /// When the change was made (epoch milliseconds), less the allowed clock difference
    /// between DynamoDB and the invalidator. A write older than the slot's epoch (since when
    /// Redis has kept its positions) becomes a delete.
    pub created_ms: Option<i64>,
    /// Delete the document (and cancel its lease) even when the op is refused as older: the
    /// batch also held an unordered delete of this key, which applies whatever the positions.
    pub delete_if_refused: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Delete,
    Set { value: String, ttl: Duration },
}

impl CacheOp {
    /// An unordered delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            kind: OpKind::Delete,
            order: None,
            created_ms: None,
            delete_if_refused: false,
        }
    }
}

/// What a lease-taking read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The cached value.
    Hit(String),
    /// Not cached, and this reader now holds the lease: it should read the table and fill.
    Lease,
    /// Not cached, and another reader holds the lease: wait for its fill.
    Wait,
}

/// The guards this crate exists for. Always on in production, where nothing can switch them
/// off: only with the `test-support` feature do [`CacheSettings`](crate::config::CacheSettings)
/// carry them, so tests can show that the consistency checks notice when one is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guards {
    /// Fills must hold the key's lease; invalidations cancel leases; one filler per key.
    pub leases: bool,
    /// Invalidations and versioned fills never replace newer state with older.
    pub ordering: bool,
    /// A node that evicted keys since a slot's epoch gets a new epoch: positions may be gone,
    /// so refreshes from records created before it delete (`apply.lua`). On ElastiCache
    /// Serverless, positions without a TTL, which `volatile-lru` never evicts (`ops/mod.rs`).
    pub evictions: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            leases: true,
            ordering: true,
            evictions: true,
        }
    }
}

/// Cloned when one failure answers for many keys (a node's part of a batch read).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("still connecting to redis (waited {0:?})")]
    Connecting(Duration),
    #[error("only {acked} of {wanted} replicas confirmed the writes within {within:?}")]
    Unconfirmed {
        acked: i64,
        wanted: u32,
        within: Duration,
    },
    #[error("connecting to redis failed: {0}")]
    Connect(#[source] std::sync::Arc<::redis::RedisError>),
    #[error("redis error: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Unexpected(String),
    /// The node's circuit breaker is open: the call was not made (see `node/breaker.rs`).
    #[error("the circuit breaker of cache node {0} is open; not called")]
    BreakerOpen(String),
}

impl CacheError {
    /// Whether the command may have run although its caller got no answer: a timeout, or a
    /// connection that died after the request went out. A probe that failed so may have taken
    /// its key's lease, which its caller then hands back (as the lease's own token, that is
    /// safe whether or not it did). An error before anything was sent (an open breaker, a
    /// connection never formed) or an error reply says it did not.
    pub fn may_have_run(&self) -> bool {
        match self {
            CacheError::Timeout(_) | CacheError::Unexpected(_) => true,
            CacheError::Redis(e) => node::conn::is_dead_connection(e),
            CacheError::Connecting(_)
            | CacheError::Connect(_)
            | CacheError::BreakerOpen(_)
            | CacheError::Unconfirmed { .. } => false,
        }
    }
}

/// A batch applied in full: which of its ops Redis refused as older than what their key had
/// already seen (a replay, or a record overtaken by a newer one): as good as applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Indexes into the ops passed to [`Cache::apply`], ascending.
    pub refused: Vec<usize>,
    /// The nodes that had fewer replicas attached than configured to confirm (a shard after a
    /// failover, while its replacement replica syncs): their writes were confirmed by every
    /// replica they had, which a second failure before the replica has synced can still lose.
    pub under_replicated: Vec<UnderReplicated>,
    /// The eviction guard could not read a node's eviction count (its user may not run
    /// `INFO`, or the reply lacks `evicted_keys`): that node's refreshes were applied as
    /// deletes, which is right whatever they were, but costs a miss each (`apply.lua`).
    pub blind: bool,
}

/// A node whose writes were confirmed by fewer replicas than configured, because it had no
/// more attached (`state=online` in its `INFO replication`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderReplicated {
    /// `host:port` on a cluster; the configured endpoint's node otherwise.
    pub node: String,
    /// Replicas attached when the batch was confirmed, and how many acknowledged it.
    pub online: u32,
    /// `REDIS_CONFIRM_REPLICAS`.
    pub wanted: u32,
}

/// A batch that was not applied in full: the ops whose outcome is unknown, and why.
#[derive(Debug, thiserror::Error)]
#[error("{} of the batch's cache updates may not have been applied", failed.len())]
pub struct BatchError {
    /// Indexes into the ops passed to [`Cache::apply`], ascending. Every other op was applied
    /// (or refused as older, which is as good).
    pub failed: Vec<usize>,
    #[source]
    pub source: CacheError,
}

impl BatchError {
    /// Nothing is known to have been applied.
    pub fn all(ops: usize, source: CacheError) -> Self {
        Self {
            failed: (0..ops).collect(),
            source,
        }
    }
}

/// A fill request: the value for `key`, allowed only while `token` holds the lease. Owned, so a
/// fill can outlive the request that read the table: the read path answers first and fills after.
#[derive(Debug, Clone)]
pub struct Fill {
    pub key: String,
    pub token: String,
    pub value: String,
    pub ttl: Duration,
    /// The item's version, when a version attribute is configured: a fill older than what the
    /// key has seen is refused.
    pub order: Option<Order>,
}

/// What the read path and the invalidator need from a cache. A trait so the logic can be unit
/// tested against an in-memory map and so tests can count or fail calls to a real Redis.
pub trait Cache: Send + Sync {
    /// The cached value, or the lease on a miss.
    fn probe(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Probe, CacheError>> + Send;
    /// Many keys' cached values at once, no lease taken: per key in the order given, the value
    /// or `None`. On a cluster the keys go to their nodes in parallel, each node's through its
    /// breaker, so a failing node fails its own keys only.
    fn get_many(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Vec<Result<Option<String>, CacheError>>> + Send;
    /// [`Cache::probe`] for many keys at once, all with one `token`: what a batch read does for
    /// the keys [`Cache::get_many`] found missing. This default probes them one by one, all in
    /// flight together.
    fn probe_many(
        &self,
        keys: &[String],
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Vec<Result<Probe, CacheError>>> + Send {
        futures::future::join_all(keys.iter().map(|key| self.probe(key, token, lease)))
    }
    /// Writes a value if the lease is still held; `Ok(false)` when refused. The future owns what
    /// it needs: the read path runs it after the answer has gone out.
    fn fill(&self, fill: Fill) -> impl Future<Output = Result<bool, CacheError>> + Send + 'static;
    /// Hands back a lease this reader will not fill with, if it is still this reader's. The
    /// future owns what it needs, so a caller can also leave it running in the background.
    fn release(
        &self,
        key: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), CacheError>> + Send + 'static;
    /// Applies `ops`, at most one per key (the invalidator collapses a key's records first), in
    /// as few round trips as the deployment allows. Which ops failed is reported exactly, so
    /// the invalidator can name the earliest record whose change is not known to be applied.
    fn apply(&self, ops: &[CacheOp]) -> impl Future<Output = Result<Applied, BatchError>> + Send;
    /// [`Cache::apply`] for a part of a batch sent while `ahead` ops of the same batch are still
    /// in flight before it: its time budget covers theirs too, since the server works through
    /// them first.
    fn apply_after(
        &self,
        ops: &[CacheOp],
        ahead: usize,
    ) -> impl Future<Output = Result<Applied, BatchError>> + Send {
        let _ = ahead;
        self.apply(ops)
    }
}

/// How long `{key}:ver` lives: past the stream's 24-hour retention, so no record still
/// deliverable can be older than a forgotten version.
pub const VERSION_TTL: Duration = Duration::from_secs(25 * 3600);

/// How long a lease's key lives in Redis (its expiry is in its value, `lease.lua`): past
/// [`VERSION_TTL`], so volatile-ttl evicts a lease after the product's other keys. A lease is
/// deleted when its reader fills or hands it back, or by the next change of its key; only a
/// reader that died holding one leaves it to this.
pub const LEASE_KEY_TTL: Duration = Duration::from_secs(26 * 3600);

/// The lease key of a cache key.
pub fn lease_key(key: &str) -> String {
    format!("{{{key}}}:lease")
}

/// The version key of a cache key.
pub fn version_key(key: &str) -> String {
    format!("{{{key}}}:ver")
}

/// Where one batch stages the new document of a cache key, for the apply script to move into
/// place. `batch` is unique per batch, so a batch still in flight (its invocation timed out and
/// was retried) cannot move another batch's document.
pub fn staged_key(key: &str, batch: &str) -> String {
    format!("{{{key}}}:staged:{batch}")
}

/// The epoch key of the hash slot a cache key lives in (see [`slots`]).
pub fn epoch_key(key: &str) -> String {
    slots::epoch_key_for(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_compare_numerically_then_by_minor() {
        let v = |m: &str, removed| Order::version(m, removed).unwrap();
        let s = |m: &str| Order::sequence(m).unwrap();
        assert!(v("10", false) > v("9", false));
        assert!(s("111000000000000000002") > s("111000000000000000001"));
        assert!(v("5", true) > v("5", false));
        assert_eq!(v("5", false), v("5", false));
        for bad in ["", "-1", "01", "1.5", "1e3", "x"] {
            assert_eq!(Order::sequence(bad), None, "{bad}");
            assert_eq!(Order::version(bad, false), None, "{bad}");
        }
    }

    #[test]
    fn a_position_decodes_from_what_redis_holds_and_nothing_else() {
        for order in [
            Order::sequence("111000000000000000002").unwrap(),
            Order::version("8", true).unwrap(),
            Order::version("0", false).unwrap(),
        ] {
            assert_eq!(Order::decode(&order.encode()), Some(order));
        }
        for bad in [
            "",
            "S",
            "S02:12",
            "S03:12:0",
            "X02:12:0",
            "S02:12:0:1",
            "S02:1x:0",
            "S02:12:",
        ] {
            assert_eq!(Order::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn positions_of_different_kinds_do_not_compare() {
        let seq = Order::sequence("111000000000000000002").unwrap();
        let ver = Order::version("8", false).unwrap();
        assert_eq!(seq.partial_cmp(&ver), None);
        assert_eq!(ver.partial_cmp(&seq), None);
        assert_ne!(seq, ver);
        assert_eq!(seq.encode(), "S21:111000000000000000002:0");
        assert_eq!(Order::version("8", true).unwrap().encode(), "V01:8:1");
        // Of one kind, the encodings order as the positions do.
        let pairs = [
            ("9", "10"),
            ("111000000000000000001", "111000000000000000002"),
        ];
        for (older, newer) in pairs {
            let (a, b) = (
                Order::sequence(older).unwrap(),
                Order::sequence(newer).unwrap(),
            );
            assert!(a < b && a.encode() < b.encode());
        }
        assert!(
            Order::version("8", false).unwrap().encode()
                < Order::version("8", true).unwrap().encode()
        );
    }

    #[test]
    fn side_keys_share_the_items_hash_slot() {
        assert_eq!(lease_key("product:42"), "{product:42}:lease");
        assert_eq!(version_key("product:42"), "{product:42}:ver");
        assert_eq!(staged_key("product:42", "7f"), "{product:42}:staged:7f");
    }
}
