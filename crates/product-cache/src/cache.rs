//! The Redis side: lease-guarded reads and fills, ordered invalidations in pipelined batches, each
//! bounded by a timeout so that a slow or absent Redis costs a request milliseconds, never its
//! answer.
//!
//! # Keys of one product
//! - `product:42`: the plain JSON document (or `null` for "not found"), what any reader sees.
//! - `{product:42}:lease`: the token of the one reader allowed to fill the key (Facebook
//!   memcache's leases). Any invalidation deletes it, so a fill that raced an invalidation fails.
//! - `{product:42}:ver`: the newest [`Order`] applied to the key. An older or repeated record is
//!   refused, and after a REMOVE it is the tombstone that keeps an older refresh out.
//!
//! The braces make the side keys hash like `product:42` itself, so each script touches a single
//! Redis Cluster slot.

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;

/// The value cached under a product's key when the table has no such item. A JSON document is
/// always an object, so `null` cannot be mistaken for one, and a foreign reader doing
/// `JSON.parse` gets `null`, which every such reader already treats as "no product".
pub const NOT_FOUND: &str = "null";

/// A position in an item's history: a stream `SequenceNumber`, or the item's version attribute.
/// `major` is a non-negative integer in decimal without leading zeros (compared by length, then
/// digit by digit, so 40-digit sequence numbers compare exactly); `minor` orders a REMOVE after
/// the write that carried the same version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    major: String,
    minor: u8,
}

impl Ord for Order {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.major.len(), &self.major, self.minor).cmp(&(
            other.major.len(),
            &other.major,
            other.minor,
        ))
    }
}

impl PartialOrd for Order {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Order {
    /// `None` unless `major` is a plain non-negative integer.
    pub fn new(major: &str, minor: u8) -> Option<Self> {
        let canonical = !major.is_empty()
            && major.bytes().all(|b| b.is_ascii_digit())
            && (major == "0" || !major.starts_with('0'));
        canonical.then(|| Self {
            major: major.to_owned(),
            minor,
        })
    }

    fn encode(&self) -> String {
        format!("{}:{}", self.major, self.minor)
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
    /// between DynamoDB and Redis. A write older than the Redis instance becomes a delete.
    pub created_ms: Option<i64>,
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

/// The guards this crate exists for. Always on in production; tests switch them off to prove
/// that the consistency checker notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guards {
    /// Fills must hold the key's lease; invalidations cancel leases; one filler per key.
    pub leases: bool,
    /// Invalidations and versioned fills never replace newer state with older.
    pub ordering: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            leases: true,
            ordering: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Unexpected(String),
}

/// A fill request: the value for `key`, allowed only while `token` holds the lease.
#[derive(Debug, Clone, Copy)]
pub struct Fill<'a> {
    pub key: &'a str,
    pub token: &'a str,
    pub value: &'a str,
    pub ttl: Duration,
    /// The item's version, when a version attribute is configured: a fill older than what the
    /// key has seen is refused.
    pub order: Option<&'a Order>,
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
    /// Writes a value if the lease is still held; `Ok(false)` when refused.
    fn fill(&self, fill: Fill<'_>) -> impl Future<Output = Result<bool, CacheError>> + Send;
    /// Applies `ops` in order, in one round trip.
    fn apply(&self, ops: &[CacheOp]) -> impl Future<Output = Result<(), CacheError>> + Send;
}

/// How long `{key}:ver` lives: past the stream's 24-hour retention, so no record still
/// deliverable can be older than a forgotten version.
pub const VERSION_TTL: Duration = Duration::from_secs(25 * 3600);

/// The lease key of a cache key.
pub fn lease_key(key: &str) -> String {
    format!("{{{key}}}:lease")
}

/// The version key of a cache key.
pub fn version_key(key: &str) -> String {
    format!("{{{key}}}:ver")
}

// `newer(a, b)`: is order `a` ("major:minor") strictly newer than `b`?
const NEWER: &str = r"
local function newer(a, b)
  local am, an = string.match(a, '^(%d+):(%d+)$')
  local bm, bn = string.match(b, '^(%d+):(%d+)$')
  if not bm then return true end
  if #am ~= #bm then return #am > #bm end
  if am ~= bm then return am > bm end
  return tonumber(an) > tonumber(bn)
end
";

/// KEYS: key, lease. ARGV: token, lease ms, use leases (1/0).
/// Returns {1, value} on a hit, {2, nil} when the lease was taken, {3, nil} when someone else
/// holds it.
const PROBE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if ARGV[3] == '0' then return {2, false} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, false} end
return {3, false}
";

/// KEYS: key, lease, ver. ARGV: token, value, ttl s, order ('' for none), ver ttl s,
/// use leases (1/0), use ordering (1/0). Returns 1 if written, 0 if refused.
const FILL: &str = r"
if ARGV[6] == '1' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[7] == '1' and ARGV[4] ~= '' then
  local cur = redis.call('GET', KEYS[3])
  if cur and cur ~= ARGV[4] and newer(cur, ARGV[4]) then return 0 end
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[6] == '1' then redis.call('DEL', KEYS[2]) end
return 1
";

/// KEYS: key, lease, ver. ARGV: 'set' or 'del', value, ttl s, order ('' for none), ver ttl s,
/// use ordering (1/0), the record's creation time less the clock margin (epoch ms, '' if
/// unknown). Returns 1 if applied, 0 if older than what the key has seen.
///
/// A write from a record created before this Redis started is applied as a delete: a restart
/// (or a node replaced empty) forgot the positions, so the record may be a replay older than
/// changes already acknowledged. A delete is right whatever it is; records created after the
/// start are ordered by the positions this Redis has seen, all of them.
const APPLY: &str = r"
local ordered = ARGV[6] == '1' and ARGV[4] ~= ''
local kind = ARGV[1]
if ordered then
  local cur = redis.call('GET', KEYS[3])
  if cur and not newer(ARGV[4], cur) then return 0 end
  if kind == 'set' then
    local info = redis.call('INFO', 'server')
    local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
    local started = (tonumber(redis.call('TIME')[1]) - uptime) * 1000
    local created = tonumber(ARGV[7])
    if not created or created < started then kind = 'del' end
  end
end
redis.call('DEL', KEYS[2])
if kind == 'set' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
if ordered then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5]) end
return 1
";

struct Scripts {
    probe: redis::Script,
    fill: redis::Script,
    apply: redis::Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        probe: redis::Script::new(PROBE),
        fill: redis::Script::new(&format!("{NEWER}{FILL}")),
        apply: redis::Script::new(&format!("{NEWER}{APPLY}")),
    })
}

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
    /// and serves from DynamoDB; the first command connects.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, CacheError> {
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
            guards: Guards::default(),
        })
    }

    /// A Redis Cluster reached through `url` (the ElastiCache configuration endpoint). It
    /// follows MOVED/ASK redirections during resharding and failover.
    pub fn cluster(url: &str, timeout: Duration) -> Result<Self, CacheError> {
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
            guards: Guards::default(),
        })
    }

    /// Test-only: switch guards off to show what they prevent.
    #[doc(hidden)]
    pub fn with_guards(mut self, guards: Guards) -> Self {
        self.guards = guards;
        self
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

/// An in-memory cache for unit tests: the same semantics as the scripts, no TTLs, optional
/// failure injection.
#[doc(hidden)]
pub mod memory {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemoryCache {
        // A std Mutex: it is never held across an await.
        pub entries: Mutex<HashMap<String, (String, Duration)>>,
        pub leases: Mutex<HashMap<String, String>>,
        pub versions: Mutex<HashMap<String, Order>>,
        pub fail: AtomicBool,
        pub calls: AtomicUsize,
    }

    impl MemoryCache {
        fn enter(&self) -> Result<(), CacheError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                Err(CacheError::Timeout(Duration::ZERO))
            } else {
                Ok(())
            }
        }

        pub fn value(&self, key: &str) -> Option<String> {
            self.entries.lock().unwrap().get(key).map(|e| e.0.clone())
        }
    }

    fn newer(a: &Order, b: &Order) -> bool {
        a > b
    }

    impl Cache for MemoryCache {
        async fn probe(&self, key: &str, token: &str, _: Duration) -> Result<Probe, CacheError> {
            self.enter()?;
            if let Some(v) = self.value(key) {
                return Ok(Probe::Hit(v));
            }
            let mut leases = self.leases.lock().unwrap();
            if leases.contains_key(key) {
                return Ok(Probe::Wait);
            }
            leases.insert(key.to_owned(), token.to_owned());
            Ok(Probe::Lease)
        }

        async fn fill(&self, f: Fill<'_>) -> Result<bool, CacheError> {
            self.enter()?;
            let mut leases = self.leases.lock().unwrap();
            if leases.get(f.key).map(String::as_str) != Some(f.token) {
                return Ok(false);
            }
            if let Some(order) = f.order {
                let mut versions = self.versions.lock().unwrap();
                if versions.get(f.key).is_some_and(|cur| newer(cur, order)) {
                    return Ok(false);
                }
                versions.insert(f.key.to_owned(), order.clone());
            }
            leases.remove(f.key);
            self.entries
                .lock()
                .unwrap()
                .insert(f.key.to_owned(), (f.value.to_owned(), f.ttl));
            Ok(true)
        }

        async fn apply(&self, ops: &[CacheOp]) -> Result<(), CacheError> {
            self.enter()?;
            let mut entries = self.entries.lock().unwrap();
            let mut versions = self.versions.lock().unwrap();
            for op in ops {
                // An in-memory cache never restarts: every record is newer than it.
                if let Some(order) = &op.order {
                    if versions.get(&op.key).is_some_and(|cur| !newer(order, cur)) {
                        continue;
                    }
                    versions.insert(op.key.clone(), order.clone());
                }
                self.leases.lock().unwrap().remove(&op.key);
                match &op.kind {
                    OpKind::Delete => {
                        entries.remove(&op.key);
                    }
                    OpKind::Set { value, ttl } => {
                        entries.insert(op.key.clone(), (value.clone(), *ttl));
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_compare_numerically_then_by_minor() {
        let o = |m: &str, n| Order::new(m, n).unwrap();
        assert!(o("10", 0) > o("9", 0));
        assert!(o("111000000000000000002", 0) > o("111000000000000000001", 0));
        assert!(o("5", 1) > o("5", 0));
        assert_eq!(o("5", 0), o("5", 0));
        for bad in ["", "-1", "01", "1.5", "1e3", "x"] {
            assert_eq!(Order::new(bad, 0), None, "{bad}");
        }
    }

    #[test]
    fn side_keys_share_the_items_hash_slot() {
        assert_eq!(lease_key("product:42"), "{product:42}:lease");
        assert_eq!(version_key("product:42"), "{product:42}:ver");
    }
}
