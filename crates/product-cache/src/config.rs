//! Settings read once at cold start from environment variables.
//!
//! Every variable has a documented default except `TABLE_NAME` (and `REDIS_URL` for the functions
//! that need it). A malformed value fails start-up with a message naming the variable: a function
//! that starts with a half-understood configuration would fail every request instead.
//!
//! Split by job: this file parses and validates; [`variables`] lists every variable as data
//! (name, functions, default, unit), the list `docs/configuration.md` and the local stack are
//! checked against.

pub mod variables;

use std::time::Duration;

use crate::id::KeyType;

pub use variables::{variable, Function, Variable, VARIABLES};

/// How the invalidator treats INSERT and MODIFY records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationMode {
    /// Remove the cached entry; the next read fills it from the table.
    Delete,
    /// Write the record's new image into the cache, so the next read is already a hit.
    Refresh,
}

impl std::str::FromStr for InvalidationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "delete" => Ok(Self::Delete),
            "refresh" => Ok(Self::Refresh),
            other => Err(format!("expected `delete` or `refresh`, got `{other}`")),
        }
    }
}

/// Everything both functions need to agree on: how items are keyed and how long entries live.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Prefix of every cache key; the key of item `42` is `<prefix>42`.
    pub key_prefix: String,
    /// Name of the table's partition key attribute.
    pub key_attribute: String,
    /// DynamoDB type of the partition key (`S` or `N`).
    pub key_type: KeyType,
    /// TTL of a cached item: only the safety net, the stream keeps entries fresh.
    pub ttl: Duration,
    /// TTL of a cached "not found".
    pub negative_ttl: Duration,
    /// Upper bound on any single Redis operation before the cache is bypassed.
    pub redis_timeout: Duration,
    /// How long a reader that missed holds the right to fill the key: at least the table call
    /// it guards (`DYNAMODB_TIMEOUT_MS`, retries included) and the fill after it
    /// (`REDIS_TIMEOUT_MS`), checked at start. If the holder dies, another reader takes over
    /// once it lapses; readers that find it wait at most `lease_wait` meanwhile.
    pub lease: Duration,
    /// How long a reader that found someone else's lease waits for the fill before reading the
    /// table itself (without filling).
    pub lease_wait: Duration,
    /// An item attribute holding a version number that increases with every write. When set,
    /// the cache is ordered by it instead of by the stream's sequence numbers, and fills are
    /// ordered too.
    pub version_attribute: Option<String>,
    /// How far DynamoDB's clock (stream record times) may run ahead of Redis's. A refresh from a
    /// record created less than this after the Redis instance started becomes a delete.
    pub clock_margin: Duration,
    /// Switches for the consistency guards, so tests can show what each one prevents. Only
    /// with the `test-support` feature: in the functions they are always on.
    #[cfg(feature = "test-support")]
    pub guards: crate::cache::Guards,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            key_prefix: "product:".to_owned(),
            key_attribute: "productId".to_owned(),
            key_type: KeyType::S,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
            redis_timeout: Duration::from_millis(100),
            lease: Duration::from_millis(4000),
            lease_wait: Duration::from_millis(1000),
            version_attribute: None,
            clock_margin: Duration::from_secs(2),
            #[cfg(feature = "test-support")]
            guards: crate::cache::Guards::default(),
        }
    }
}

impl CacheSettings {
    /// The guards in force: all of them, unless a test switched one off.
    pub fn guards(&self) -> crate::cache::Guards {
        #[cfg(feature = "test-support")]
        return self.guards;
        #[cfg(not(feature = "test-support"))]
        crate::cache::Guards::default()
    }
}

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port` or, for TLS (ElastiCache in-transit encryption), `rediss://host:port`.
    pub url: String,
    /// Redis Cluster (ElastiCache cluster mode enabled): `url` is the configuration endpoint.
    /// Always on for a serverless cache, which answers as a one-shard cluster.
    pub cluster: bool,
    /// A node-based cache or ElastiCache Serverless (`REDIS_CACHE_TYPE`).
    pub cache_type: CacheType,
    /// A Secrets Manager secret holding the AUTH token, read once at cold start: its
    /// SecretString is the token itself or JSON with a `token` (or `password`) field.
    pub auth_secret_arn: Option<String>,
    /// Bound on forming a connection (DNS, TCP, TLS, AUTH, the slot map), which runs in the
    /// background: requests bypass the cache meanwhile rather than wait for it.
    pub connect_timeout: Duration,
    /// A PEM file of the roots to trust for `rediss://` (a private CA), read once at cold
    /// start; without it, the Mozilla roots built into the function, which ElastiCache's
    /// certificates chain to.
    pub ca_file: Option<std::path::PathBuf>,
    /// Replicas (of every primary written to) that must hold a batch's writes before the
    /// invalidator acknowledges it (`WAIT`); 0 acknowledges what the primary applied.
    pub confirm_replicas: u32,
    /// Bound on that confirmation; a batch not confirmed in time is reported for retry.
    pub confirm_timeout: Duration,
    /// Send a hit's `GET` to a replica of the key's shard (Redis Cluster only). Needs every
    /// replica to confirm invalidations (`confirm_replicas`), or a replica may still serve what
    /// an acknowledged invalidation removed.
    pub read_from_replicas: bool,
    /// ElastiCache IAM authentication instead of an AUTH token: the user to authenticate as,
    /// with a token the function signs itself (`crate::iam`).
    pub iam: Option<IamSettings>,
    /// Idle time before TCP keepalive probes start on every Redis connection
    /// (`REDIS_TCP_KEEPALIVE_SECS`, 0 = off): a connection a middle box dropped while the
    /// function sat idle is found dead by the probes rather than by a request's timeout.
    pub tcp_keepalive: Option<Duration>,
    /// The circuit breaker each process keeps per cache node (`cache/breaker.rs`).
    pub breaker: BreakerSettings,
}

/// A cache node's circuit breaker (`REDIS_BREAKER_FAILURES`, `REDIS_BREAKER_OPEN_MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failed calls to a node (timeouts, failed connects, dropped connections)
    /// after which its calls fail fast; 0 turns the breaker off.
    pub failures: u32,
    /// How long they fail fast before one trial call goes through. Short: a node's recovery is
    /// noticed within it.
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 3,
            open_for: Duration::from_millis(1000),
        }
    }
}

impl BreakerSettings {
    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            failures: parsed(src, "REDIS_BREAKER_FAILURES", d.failures)?,
            open_for: duration(src, "REDIS_BREAKER_OPEN_MS", d.open_for, Unit::Millis, true)?,
        })
    }
}

/// What kind of ElastiCache cache the functions talk to (`REDIS_CACHE_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheType {
    /// A node-based cache (a replication group, or any Redis/Valkey): what this project
    /// deployed before serverless, and what the local stack runs by default.
    #[default]
    Nodes,
    /// ElastiCache Serverless: one endpoint that answers as a one-shard cluster, TLS always, no
    /// `WAIT` (nothing can confirm a write to a replica), `maxmemory-policy` fixed at
    /// `volatile-lru`, at most 3,999 arguments a request, IAM tokens signed for a serverless
    /// cache.
    Serverless,
}

impl std::str::FromStr for CacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nodes" => Ok(Self::Nodes),
            "serverless" => Ok(Self::Serverless),
            other => Err(format!("expected `nodes` or `serverless`, got `{other}`")),
        }
    }
}

/// ElastiCache IAM authentication (`REDIS_IAM_USER`, `REDIS_IAM_CACHE_NAME`). The Region is the
/// SDK's, the credentials the function's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamSettings {
    /// The IAM-enabled ElastiCache user's id (its user name must be the same): the AUTH
    /// username, and the `User` the token is signed for.
    pub user_id: String,
    /// The cache the token is signed for: the replication group id, or the serverless cache's
    /// name, in lowercase (ElastiCache lowercases names when it creates a cache, and checks the
    /// token against that).
    pub cache: String,
    /// The cache is serverless: the token also says `ResourceType=ServerlessCache`.
    pub serverless: bool,
}

impl IamSettings {
    /// Both variables or neither: `None` when neither is set. The cache's name is
    /// `REDIS_IAM_CACHE_NAME`, or by its earlier name `REDIS_IAM_REPLICATION_GROUP` (not both).
    pub fn from_source(
        src: &(impl Source + ?Sized),
        cache_type: CacheType,
    ) -> Result<Option<Self>, ConfigError> {
        let get = |name| src.get(name).filter(|v| !v.trim().is_empty());
        let (name_var, cache) = match (
            get("REDIS_IAM_CACHE_NAME"),
            get("REDIS_IAM_REPLICATION_GROUP"),
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "REDIS_IAM_CACHE_NAME",
                    "REDIS_IAM_REPLICATION_GROUP",
                    "the second is the first's earlier name; keep one",
                ))
            }
            (Some(name), None) => ("REDIS_IAM_CACHE_NAME", Some(name)),
            (None, Some(group)) => ("REDIS_IAM_REPLICATION_GROUP", Some(group)),
            (None, None) => ("REDIS_IAM_CACHE_NAME", None),
        };
        let (user_id, cache) = match (get("REDIS_IAM_USER"), cache) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(ConfigError::MissingWith(
                    "REDIS_IAM_CACHE_NAME",
                    "REDIS_IAM_USER",
                ))
            }
            (None, Some(_)) => return Err(ConfigError::MissingWith("REDIS_IAM_USER", name_var)),
            (Some(user), Some(cache)) => (user, cache),
        };
        for (name, value) in [("REDIS_IAM_USER", &user_id), (name_var, &cache)] {
            // ElastiCache's rule for both ids; it also keeps them out of any URL encoding.
            let ok = value.starts_with(|c: char| c.is_ascii_alphabetic())
                && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !ok {
                return Err(ConfigError::Invalid {
                    name,
                    value: value.clone(),
                    reason: "must start with a letter and contain only letters, digits and hyphens"
                        .into(),
                });
            }
        }
        Ok(Some(Self {
            user_id,
            cache: cache.to_ascii_lowercase(),
            serverless: cache_type == CacheType::Serverless,
        }))
    }
}

impl RedisSettings {
    /// A single node at `url`, no AUTH token: the local stack and tests.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster: false,
            cache_type: CacheType::Nodes,
            auth_secret_arn: None,
            connect_timeout: Duration::from_secs(2),
            ca_file: None,
            confirm_replicas: 0,
            confirm_timeout: Duration::from_millis(500),
            read_from_replicas: false,
            iam: None,
            tcp_keepalive: Some(Duration::from_secs(30)),
            breaker: BreakerSettings::default(),
        }
    }

    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::new(required(src, "REDIS_URL")?);
        let auth_secret_arn = src
            .get("REDIS_AUTH_SECRET_ARN")
            .filter(|v| !v.trim().is_empty());
        let cache_type: CacheType = parsed(src, "REDIS_CACHE_TYPE", d.cache_type)?;
        let iam = IamSettings::from_source(src, cache_type)?;
        if iam.is_some() {
            if auth_secret_arn.is_some() {
                return Err(ConfigError::Conflict(
                    "REDIS_IAM_USER",
                    "REDIS_AUTH_SECRET_ARN",
                    "IAM authentication signs its own token; unset one of them",
                ));
            }
            let authority = d.url.split_once("://").map_or("", |(_, rest)| rest);
            if authority
                .split('/')
                .next()
                .unwrap_or_default()
                .contains('@')
            {
                return Err(ConfigError::Invalid {
                    name: "REDIS_URL",
                    value: "<redacted: it carries credentials>".into(),
                    reason: "must not carry credentials when REDIS_IAM_USER is set".into(),
                });
            }
        }
        let serverless = cache_type == CacheType::Serverless;
        Ok(Self {
            // A serverless cache answers as a cluster; the variable may say so or be left out.
            cluster: parsed(src, "REDIS_CLUSTER", serverless)?,
            cache_type,
            auth_secret_arn,
            iam,
            connect_timeout: duration(
                src,
                "REDIS_CONNECT_TIMEOUT_MS",
                d.connect_timeout,
                Unit::Millis,
                true,
            )?,
            ca_file: src
                .get("REDIS_CA_FILE")
                .filter(|v| !v.trim().is_empty())
                .map(Into::into),
            confirm_replicas: parsed(src, "REDIS_CONFIRM_REPLICAS", d.confirm_replicas)?,
            confirm_timeout: duration(
                src,
                "REDIS_CONFIRM_TIMEOUT_MS",
                d.confirm_timeout,
                Unit::Millis,
                true,
            )?,
            read_from_replicas: parsed(src, "REDIS_READ_FROM_REPLICAS", d.read_from_replicas)?,
            tcp_keepalive: Some(duration(
                src,
                "REDIS_TCP_KEEPALIVE_SECS",
                d.tcp_keepalive.unwrap_or_default(),
                Unit::Secs,
                false,
            )?)
            .filter(|idle| !idle.is_zero()),
            breaker: BreakerSettings::from_source(src)?,
            ..d
        })
        .and_then(|s: Self| {
            if s.cache_type == CacheType::Serverless {
                s.serverless_rules()?;
            }
            if s.read_from_replicas && !s.cluster {
                return Err(ConfigError::Invalid {
                    name: "REDIS_READ_FROM_REPLICAS",
                    value: "true".into(),
                    reason: "replica reads need REDIS_CLUSTER=true".into(),
                });
            }
            Ok(s)
        })
    }
}

impl RedisSettings {
    /// What cannot hold on ElastiCache Serverless, refused at start rather than failing every
    /// call (or stalling the stream) once running.
    pub(crate) fn serverless_rules(&self) -> Result<(), ConfigError> {
        let invalid = |name, value: &str, reason: &str| ConfigError::Invalid {
            name,
            value: value.to_owned(),
            reason: format!("{reason} (REDIS_CACHE_TYPE=serverless)"),
        };
        if !self.cluster {
            return Err(invalid(
                "REDIS_CLUSTER",
                "false",
                "a serverless cache answers as a cluster: leave it unset or true",
            ));
        }
        if !self.url.starts_with("rediss://") {
            return Err(invalid(
                "REDIS_URL",
                "<redacted>",
                "a serverless cache takes TLS connections only: use rediss://",
            ));
        }
        if self.confirm_replicas > 0 {
            return Err(invalid(
                "REDIS_CONFIRM_REPLICAS",
                &self.confirm_replicas.to_string(),
                "a serverless cache has no WAIT, and nothing can confirm a write on its \
                 replicas: set 0",
            ));
        }
        let user_in_url = self
            .url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next()?.split_once('@'))
            .is_some_and(|(userinfo, _)| !userinfo.starts_with(':') && !userinfo.is_empty());
        if self.auth_secret_arn.is_some() && !user_in_url {
            return Err(invalid(
                "REDIS_AUTH_SECRET_ARN",
                "<an AUTH token>",
                "a serverless cache has no AUTH token, only RBAC users (name the user in \
                 REDIS_URL, rediss://USER@host:6379) or IAM",
            ));
        }
        Ok(())
    }
}

/// Bounds on the table's calls (`DYNAMODB_ATTEMPT_TIMEOUT_MS`, `DYNAMODB_TIMEOUT_MS`). The SDK
/// bounds only connecting by default: a request sent on a pooled connection that died while
/// the environment was frozen, or over a route that drops packets, would wait for an answer
/// until the function's own timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsTimeouts {
    /// One attempt, connecting included. A timed-out attempt is retried (the SDK's standard
    /// retries) on a new connection: the one it gave up on is closed. Far above a healthy
    /// `GetItem` (single-digit milliseconds from Lambda in the table's Region).
    pub attempt: Duration,
    /// The whole call, every retry and its backoff included; then the read answers 503. Well
    /// inside the read function's timeout and API Gateway's 30 s.
    pub operation: Duration,
}

impl Default for AwsTimeouts {
    fn default() -> Self {
        Self {
            attempt: Duration::from_millis(1000),
            operation: Duration::from_millis(3000),
        }
    }
}

impl AwsTimeouts {
    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::default();
        let attempt = duration(
            src,
            "DYNAMODB_ATTEMPT_TIMEOUT_MS",
            d.attempt,
            Unit::Millis,
            true,
        )?;
        let operation = duration(src, "DYNAMODB_TIMEOUT_MS", d.operation, Unit::Millis, true)?;
        if attempt > operation {
            return Err(ConfigError::Invalid {
                name: "DYNAMODB_ATTEMPT_TIMEOUT_MS",
                value: attempt.as_millis().to_string(),
                reason: format!(
                    "must not exceed DYNAMODB_TIMEOUT_MS ({} ms), which bounds every attempt",
                    operation.as_millis()
                ),
            });
        }
        Ok(Self { attempt, operation })
    }
}

/// Settings of the read function.
#[derive(Debug, Clone)]
pub struct ReadSettings {
    pub redis: RedisSettings,
    pub table_name: String,
    /// Strongly consistent `GetItem`. Costs twice the read capacity of an eventually consistent
    /// read, but an eventually consistent read can return the version the stream just replaced
    /// and put it back into the cache.
    pub consistent_read: bool,
    pub cache: CacheSettings,
    /// Bounds on each `GetItem`.
    pub table_timeouts: AwsTimeouts,
}

impl ReadSettings {
    /// The defaults around what has none: strongly consistent reads of `table`, as the read function's defaults have it.
    pub fn new(redis: RedisSettings, table_name: impl Into<String>, cache: CacheSettings) -> Self {
        Self {
            redis,
            table_name: table_name.into(),
            consistent_read: true,
            cache,
            table_timeouts: AwsTimeouts::default(),
        }
    }
}

/// Settings of the invalidator function.
#[derive(Debug, Clone)]
pub struct InvalidatorSettings {
    pub redis: RedisSettings,
    pub mode: InvalidationMode,
    pub cache: CacheSettings,
}

/// A variable that is missing or cannot be understood.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is required but not set")]
    Missing(&'static str),
    #[error("environment variable {0} is required with {1} but not set")]
    MissingWith(&'static str, &'static str),
    #[error("environment variables {0} and {1} must not both be set: {2}")]
    Conflict(&'static str, &'static str, &'static str),
    #[error("environment variable {name} has an invalid value {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

/// Where settings come from. A trait so tests can supply a map instead of mutating the process
/// environment, which is shared by every test thread.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Sources asked in order: the first that has a variable answers. The local stack runs its
/// functions on its own overrides, then the environment, then the template's values.
pub struct Layers<'a>(pub Vec<&'a dyn Source>);

impl Source for Layers<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find_map(|layer| layer.get(name))
    }
}

impl<S: AsRef<str>> Source for Vec<(S, S)> {
    fn get(&self, name: &str) -> Option<String> {
        Source::get(self.as_slice(), name)
    }
}

impl<S: AsRef<str>> Source for [(S, S)] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| v.as_ref().to_owned())
    }
}

fn required(src: &(impl Source + ?Sized), name: &'static str) -> Result<String, ConfigError> {
    match src.get(name) {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError::Missing(name)),
    }
}

fn parsed<T: std::str::FromStr>(
    src: &(impl Source + ?Sized),
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match src.get(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
            name,
            value: v.clone(),
            reason: e.to_string(),
        }),
    }
}

/// How a duration variable is written.
#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Millis,
}

/// A duration variable in whole `unit`s, `default` when unset. `positive` rejects 0 (an `EX 0`
/// or a zero timeout is never what was meant).
fn duration(
    src: &(impl Source + ?Sized),
    name: &'static str,
    default: Duration,
    unit: Unit,
    positive: bool,
) -> Result<Duration, ConfigError> {
    let (default, of): (u64, fn(u64) -> Duration) = match unit {
        Unit::Secs => (default.as_secs(), Duration::from_secs),
        Unit::Millis => (default.as_millis() as u64, Duration::from_millis),
    };
    let n: u64 = parsed(src, name, default)?;
    if positive && n == 0 {
        return Err(ConfigError::Invalid {
            name,
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(of(n))
}

impl CacheSettings {
    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::default();
        let key_prefix = src.get("KEY_PREFIX").unwrap_or(d.key_prefix);
        if key_prefix.contains(['{', '}']) {
            // Braces would turn part of the prefix into the Redis Cluster hash tag, and the side
            // keys that must share the item's slot would land elsewhere.
            return Err(ConfigError::Invalid {
                name: "KEY_PREFIX",
                value: key_prefix,
                reason: "must not contain `{` or `}`".into(),
            });
        }
        let key_attribute = src.get("KEY_ATTRIBUTE").unwrap_or(d.key_attribute);
        if key_attribute.is_empty() {
            return Err(ConfigError::Invalid {
                name: "KEY_ATTRIBUTE",
                value: key_attribute,
                reason: "must not be empty".into(),
            });
        }
        Ok(Self {
            key_prefix,
            key_attribute,
            key_type: parsed(src, "KEY_TYPE", d.key_type)?,
            ttl: duration(src, "CACHE_TTL_SECONDS", d.ttl, Unit::Secs, true)?,
            negative_ttl: duration(
                src,
                "NEGATIVE_TTL_SECONDS",
                d.negative_ttl,
                Unit::Secs,
                true,
            )?,
            redis_timeout: duration(src, "REDIS_TIMEOUT_MS", d.redis_timeout, Unit::Millis, true)?,
            lease: duration(src, "LEASE_MS", d.lease, Unit::Millis, true)?,
            lease_wait: duration(src, "LEASE_WAIT_MS", d.lease_wait, Unit::Millis, true)?,
            version_attribute: src
                .get("VERSION_ATTRIBUTE")
                .filter(|v| !v.trim().is_empty())
                .or(d.version_attribute),
            clock_margin: duration(src, "CLOCK_MARGIN_MS", d.clock_margin, Unit::Millis, false)?,
            #[cfg(feature = "test-support")]
            guards: d.guards,
        })
    }
}

impl ReadSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&Env)
    }

    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        let d = Self::new(
            RedisSettings::from_source(src)?,
            required(src, "TABLE_NAME")?,
            CacheSettings::from_source(src)?,
        );
        let s = Self {
            consistent_read: parsed(src, "CONSISTENT_READ", d.consistent_read)?,
            table_timeouts: AwsTimeouts::from_source(src)?,
            ..d
        };
        // The lease guards its holder's table read and fill: one that lapses first has the fill
        // refused, and the next reader reads the table again.
        let guarded = s.table_timeouts.operation + s.cache.redis_timeout;
        if s.cache.lease < guarded {
            return Err(ConfigError::Invalid {
                name: "LEASE_MS",
                value: s.cache.lease.as_millis().to_string(),
                reason: format!(
                    "must be at least DYNAMODB_TIMEOUT_MS + REDIS_TIMEOUT_MS ({} ms): a lease \
                     shorter than the table read and the fill it guards lapses before the \
                     fill, which is then refused, and another reader reads the table again",
                    guarded.as_millis()
                ),
            });
        }
        Ok(s)
    }
}

impl InvalidatorSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&Env)
    }

    pub fn from_source(src: &(impl Source + ?Sized)) -> Result<Self, ConfigError> {
        Ok(Self {
            redis: RedisSettings::from_source(src)?,
            mode: parsed(src, "INVALIDATION_MODE", InvalidationMode::Delete)?,
            cache: CacheSettings::from_source(src)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_only_required_variables_are_set() {
        let env = [("REDIS_URL", "redis://h:6379"), ("TABLE_NAME", "Products")];
        let s = ReadSettings::from_source(&env[..]).unwrap();
        assert_eq!(s.cache.key_prefix, "product:");
        assert_eq!(s.cache.key_attribute, "productId");
        assert_eq!(s.cache.key_type, KeyType::S);
        assert_eq!(s.cache.ttl, Duration::from_secs(3600));
        assert_eq!(s.cache.negative_ttl, Duration::from_secs(30));
        assert_eq!(s.cache.redis_timeout, Duration::from_millis(100));
        assert!(s.consistent_read);
        assert!(!s.redis.cluster);
        assert_eq!(s.redis.auth_secret_arn, None);
        assert_eq!(s.cache.lease, Duration::from_millis(4000));
        assert_eq!(s.cache.lease_wait, Duration::from_millis(1000));
        assert_eq!(s.cache.version_attribute, None);
        assert_eq!(s.cache.clock_margin, Duration::from_secs(2));
        assert_eq!(s.cache.guards(), crate::cache::Guards::default());
        assert_eq!(s.redis.connect_timeout, Duration::from_secs(2));
        assert_eq!(s.redis.ca_file, None);
        assert_eq!(s.redis.confirm_replicas, 0);
        assert_eq!(s.redis.confirm_timeout, Duration::from_millis(500));
        assert!(!s.redis.read_from_replicas);
        assert_eq!(s.redis.iam, None);
        assert_eq!(s.table_timeouts.attempt, Duration::from_millis(1000));
        assert_eq!(s.table_timeouts.operation, Duration::from_millis(3000));
        assert_eq!(s.redis.tcp_keepalive, Some(Duration::from_secs(30)));
        assert_eq!(s.redis.breaker.failures, 3);
        assert_eq!(s.redis.breaker.open_for, Duration::from_millis(1000));
        let i = InvalidatorSettings::from_source(&env[..]).unwrap();
        assert_eq!(i.mode, InvalidationMode::Delete);
    }

    #[test]
    fn every_variable_is_read() {
        let env = [
            ("REDIS_URL", "redis://h:6379"),
            ("TABLE_NAME", "T"),
            ("KEY_PREFIX", "p:"),
            ("KEY_ATTRIBUTE", "sku"),
            ("KEY_TYPE", "N"),
            ("CACHE_TTL_SECONDS", "60"),
            ("NEGATIVE_TTL_SECONDS", "5"),
            ("REDIS_TIMEOUT_MS", "20"),
            ("CONSISTENT_READ", "false"),
            ("INVALIDATION_MODE", "Refresh"),
            ("LEASE_MS", "1600"),
            ("LEASE_WAIT_MS", "400"),
            ("VERSION_ATTRIBUTE", "version"),
            ("REDIS_CLUSTER", "true"),
            ("CLOCK_MARGIN_MS", "0"),
            ("REDIS_CONNECT_TIMEOUT_MS", "5000"),
            ("REDIS_CA_FILE", "/etc/ca.pem"),
            ("REDIS_CONFIRM_REPLICAS", "2"),
            ("REDIS_CONFIRM_TIMEOUT_MS", "250"),
            ("REDIS_READ_FROM_REPLICAS", "true"),
            ("DYNAMODB_ATTEMPT_TIMEOUT_MS", "400"),
            ("DYNAMODB_TIMEOUT_MS", "1500"),
            ("REDIS_TCP_KEEPALIVE_SECS", "45"),
            ("REDIS_BREAKER_FAILURES", "5"),
            ("REDIS_BREAKER_OPEN_MS", "250"),
            (
                "REDIS_AUTH_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:1:secret:x",
            ),
        ];
        let s = ReadSettings::from_source(&env[..]).unwrap();
        assert_eq!(s.cache.key_prefix, "p:");
        assert_eq!(s.cache.key_attribute, "sku");
        assert_eq!(s.cache.key_type, KeyType::N);
        assert_eq!(s.cache.ttl, Duration::from_secs(60));
        assert_eq!(s.cache.negative_ttl, Duration::from_secs(5));
        assert_eq!(s.cache.redis_timeout, Duration::from_millis(20));
        assert!(!s.consistent_read);
        assert_eq!(s.cache.lease, Duration::from_millis(1600));
        assert_eq!(s.cache.lease_wait, Duration::from_millis(400));
        assert_eq!(s.cache.version_attribute.as_deref(), Some("version"));
        assert_eq!(s.redis.url, "redis://h:6379");
        assert!(s.redis.cluster);
        assert_eq!(s.cache.clock_margin, Duration::ZERO);
        assert_eq!(s.redis.connect_timeout, Duration::from_secs(5));
        assert_eq!(
            s.redis.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(s.redis.confirm_replicas, 2);
        assert_eq!(s.redis.confirm_timeout, Duration::from_millis(250));
        assert!(s.redis.read_from_replicas);
        assert_eq!(s.redis.tcp_keepalive, Some(Duration::from_secs(45)));
        assert!(s.redis.auth_secret_arn.as_deref().unwrap().ends_with(":x"));
        assert_eq!(
            s.table_timeouts,
            AwsTimeouts {
                attempt: Duration::from_millis(400),
                operation: Duration::from_millis(1500),
            }
        );
        assert_eq!(
            s.redis.breaker,
            BreakerSettings {
                failures: 5,
                open_for: Duration::from_millis(250),
            }
        );
        let i = InvalidatorSettings::from_source(&env[..]).unwrap();
        assert_eq!(i.mode, InvalidationMode::Refresh);
    }

    #[test]
    fn errors_name_the_variable() {
        let err = ReadSettings::from_source(&[("REDIS_URL", "redis://h")][..]).unwrap_err();
        assert!(err.to_string().contains("TABLE_NAME"), "{err}");

        let bad = |name: &'static str, value: &'static str| {
            let env = [
                ("REDIS_URL", "redis://h"),
                ("TABLE_NAME", "T"),
                (name, value),
            ];
            let err = ReadSettings::from_source(&env[..])
                .err()
                .or_else(|| InvalidatorSettings::from_source(&env[..]).err())
                .unwrap_or_else(|| panic!("{name}={value} was accepted"));
            assert!(err.to_string().contains(name), "{err}");
        };
        bad("CACHE_TTL_SECONDS", "an hour");
        bad("CACHE_TTL_SECONDS", "0");
        bad("NEGATIVE_TTL_SECONDS", "-1");
        bad("REDIS_TIMEOUT_MS", "0");
        bad("LEASE_MS", "0");
        bad("LEASE_WAIT_MS", "soon");
        bad("KEY_TYPE", "B");
        bad("KEY_PREFIX", "{p}:");
        bad("CONSISTENT_READ", "yes please");
        bad("INVALIDATION_MODE", "update");
        bad("REDIS_CLUSTER", "sometimes");
        bad("CLOCK_MARGIN_MS", "-5");
        bad("REDIS_CONNECT_TIMEOUT_MS", "0");
        bad("REDIS_CONFIRM_REPLICAS", "-1");
        bad("REDIS_CONFIRM_TIMEOUT_MS", "0");
        bad("REDIS_READ_FROM_REPLICAS", "true"); // without REDIS_CLUSTER
        bad("REDIS_TCP_KEEPALIVE_SECS", "-1");
        bad("REDIS_TCP_KEEPALIVE_SECS", "half a minute");
        bad("REDIS_IAM_USER", "-starts-with-a-hyphen");
        bad("REDIS_IAM_USER", "has space");
        bad("REDIS_IAM_REPLICATION_GROUP", "with/slash");
        bad("DYNAMODB_ATTEMPT_TIMEOUT_MS", "0");
        bad("DYNAMODB_TIMEOUT_MS", "3s");
        // A lease shorter than the table call and the fill it guards (3000 + 100 ms).
        bad("LEASE_MS", "3099");
        bad("DYNAMODB_ATTEMPT_TIMEOUT_MS", "3001"); // over the operation's default 3000
        bad("REDIS_BREAKER_FAILURES", "-1");
        bad("REDIS_BREAKER_FAILURES", "three");
        bad("REDIS_BREAKER_OPEN_MS", "0");
        bad("REDIS_BREAKER_OPEN_MS", "1s");
    }

    #[test]
    fn a_zero_keepalive_turns_the_probes_off() {
        let env = [
            ("REDIS_URL", "redis://h"),
            ("REDIS_TCP_KEEPALIVE_SECS", "0"),
        ];
        assert_eq!(
            RedisSettings::from_source(&env[..]).unwrap().tcp_keepalive,
            None
        );
    }

    #[test]
    fn zero_breaker_failures_turn_the_breaker_off() {
        let env = [("REDIS_URL", "redis://h"), ("REDIS_BREAKER_FAILURES", "0")];
        let s = RedisSettings::from_source(&env[..]).unwrap();
        assert_eq!(s.breaker.failures, 0);
        assert_eq!(s.breaker.open_for, BreakerSettings::default().open_for);
    }

    fn iam_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut env = vec![("REDIS_URL", "rediss://cfg.cache.amazonaws.com:6379")];
        env.extend_from_slice(extra);
        env
    }

    #[test]
    fn iam_authentication_is_read() {
        let env = iam_env(&[
            ("REDIS_IAM_USER", "product-cache-iam"),
            ("REDIS_IAM_REPLICATION_GROUP", "product-cache"),
        ]);
        let s = RedisSettings::from_source(&env[..]).unwrap();
        assert_eq!(
            s.iam,
            Some(IamSettings {
                user_id: "product-cache-iam".into(),
                cache: "product-cache".into(),
                serverless: false,
            })
        );
        assert_eq!(s.auth_secret_arn, None);
        let env = iam_env(&[
            ("REDIS_IAM_USER", "product-cache-iam"),
            ("REDIS_IAM_REPLICATION_GROUP", "Product-Cache"),
        ]);
        let s = RedisSettings::from_source(&env[..]).unwrap();
        assert_eq!(s.iam.unwrap().cache, "product-cache");
        // Empty values count as unset.
        let env = iam_env(&[("REDIS_IAM_USER", ""), ("REDIS_IAM_REPLICATION_GROUP", " ")]);
        assert_eq!(RedisSettings::from_source(&env[..]).unwrap().iam, None);
    }

    #[test]
    fn a_serverless_cache_is_read_and_what_cannot_hold_there_is_refused() {
        let base = [
            (
                "REDIS_URL",
                "rediss://my-cache-abc123.serverless.use1.cache.amazonaws.com:6379",
            ),
            ("REDIS_CACHE_TYPE", "serverless"),
        ];
        let s = RedisSettings::from_source(&base[..]).unwrap();
        assert_eq!(s.cache_type, CacheType::Serverless);
        assert!(
            s.cluster,
            "a serverless cache is a cluster without REDIS_CLUSTER"
        );
        assert_eq!(s.confirm_replicas, 0);
        // IAM: the cache's name, and the serverless form of the token.
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut env = base.to_vec();
            env.extend_from_slice(extra);
            RedisSettings::from_source(&env[..])
        };
        let iam = with(&[
            ("REDIS_IAM_USER", "product-cache-iam"),
            ("REDIS_IAM_CACHE_NAME", "My-Cache"),
        ])
        .unwrap()
        .iam
        .unwrap();
        assert_eq!(
            iam,
            IamSettings {
                user_id: "product-cache-iam".into(),
                cache: "my-cache".into(),
                serverless: true,
            }
        );
        // Settings that cannot hold there name their variable.
        for (extra, variable) in [
            (
                &[("REDIS_CONFIRM_REPLICAS", "1")][..],
                "REDIS_CONFIRM_REPLICAS",
            ),
            (&[("REDIS_CLUSTER", "false")][..], "REDIS_CLUSTER"),
            (
                &[(
                    "REDIS_AUTH_SECRET_ARN",
                    "arn:aws:secretsmanager:us-east-1:1:secret:x",
                )][..],
                "REDIS_AUTH_SECRET_ARN",
            ),
        ] {
            let err = with(extra).unwrap_err().to_string();
            assert!(
                err.contains(variable) && err.contains("serverless"),
                "{err}"
            );
        }
        let plain = [
            ("REDIS_URL", "redis://my-cache:6379"),
            ("REDIS_CACHE_TYPE", "serverless"),
        ];
        let err = RedisSettings::from_source(&plain[..])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("REDIS_URL") && err.contains("rediss://"),
            "{err}"
        );
        // An RBAC user with a password from the secret is allowed.
        let rbac = [
            ("REDIS_URL", "rediss://product-cache@my-cache:6379"),
            ("REDIS_CACHE_TYPE", "serverless"),
            (
                "REDIS_AUTH_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:1:secret:x",
            ),
        ];
        assert!(RedisSettings::from_source(&rbac[..]).is_ok());
        let bad = [
            ("REDIS_URL", "redis://h:6379"),
            ("REDIS_CACHE_TYPE", "memcached"),
        ];
        let err = RedisSettings::from_source(&bad[..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("REDIS_CACHE_TYPE"), "{err}");
    }

    #[test]
    fn iam_configuration_errors_name_the_variables() {
        let err = |extra: &[(&'static str, &'static str)]| {
            RedisSettings::from_source(&iam_env(extra)[..])
                .err()
                .unwrap_or_else(|| panic!("{extra:?} was accepted"))
                .to_string()
        };
        let both = err(&[
            ("REDIS_IAM_USER", "product-cache-iam"),
            ("REDIS_IAM_REPLICATION_GROUP", "product-cache"),
            (
                "REDIS_AUTH_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:1:secret:x",
            ),
        ]);
        assert!(
            both.contains("REDIS_IAM_USER") && both.contains("REDIS_AUTH_SECRET_ARN"),
            "{both}"
        );
        let no_group = err(&[("REDIS_IAM_USER", "product-cache-iam")]);
        assert_eq!(
            no_group,
            "environment variable REDIS_IAM_CACHE_NAME is required with REDIS_IAM_USER but not set"
        );
        let no_user = err(&[("REDIS_IAM_REPLICATION_GROUP", "product-cache")]);
        assert!(
            no_user.starts_with(
                "environment variable REDIS_IAM_USER is required with REDIS_IAM_REPLICATION_GROUP"
            ),
            "{no_user}"
        );
        let env = [
            (
                "REDIS_URL",
                "rediss://user:pass@cfg.cache.amazonaws.com:6379",
            ),
            ("REDIS_IAM_USER", "product-cache-iam"),
            ("REDIS_IAM_REPLICATION_GROUP", "product-cache"),
        ];
        let creds = RedisSettings::from_source(&env[..])
            .unwrap_err()
            .to_string();
        assert!(
            creds.contains("REDIS_URL") && creds.contains("REDIS_IAM_USER"),
            "{creds}"
        );
        assert!(!creds.contains("pass"), "{creds}");
    }
}
