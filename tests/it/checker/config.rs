//! The settings of a checker run: sizes, the read/write mix, fault rates, the guards under test,
//! the Redis deployment (one node, or a cluster with replicas and failovers), how the cache loses
//! its data and whether the version attribute flips mid-run, with their defaults and the
//! `CHECKER_*` overrides.

use std::time::Duration;

use local_stack::services::Engine;
use product_cache::cache::Guards;
use product_cache::config::InvalidationMode;

/// What to run. [`Config::new`] has the defaults; `CHECKER_OPS`, `CHECKER_SEED` and
/// `CHECKER_MAX_SECS` override the size, the seed and the time bound, and
/// `CHECKER_READS_PER_WRITE` and `CHECKER_BATCH_READERS` the mix.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: &'static str,
    pub mode: InvalidationMode,
    pub guards: Guards,
    /// One `redis-server`, or a cluster with replicas whose primaries fail over.
    pub deployment: Deployment,
    /// The server every node runs: Redis OSS by default, or Valkey, the engine the template
    /// deploys.
    pub engine: Engine,
    /// The version attribute every function starts with.
    pub version_attribute: Option<String>,
    /// Flip the version attribute mid-run (on as `version` if [`Config::version_attribute`] is
    /// `None`, else off), the invalidator and the readers each at their own point of the run: a
    /// configuration change rolled out to one function, then the other.
    pub flip_version_attribute: Option<FlipAt>,
    /// Operations (reads and writes) to issue; the run stops after them (or at `max_duration`).
    pub ops: u64,
    pub seed: u64,
    pub items: usize,
    pub writers: usize,
    pub readers: usize,
    /// Of the `readers`, how many read in batches (`GET /products?ids=...`, through
    /// `ReadPath::answer_many`) rather than one product at a time (`CHECKER_BATCH_READERS`,
    /// default 2 of 8; 0: single readers only). A batch request is one operation of the
    /// budget and of the readers' pace, and each product it answers one read of the history.
    pub batch_readers: usize,
    /// How many ids a batch request draws from the items, uniformly from this range, repeats
    /// possible (a repeat collapses into its first place, as the route does).
    pub batch_ids: (usize, usize),
    /// Of the batch requests: answered first and filled after the answer (`answer_many` and
    /// then its after-work, as the Lambda function with its extension does), rather than
    /// filled before the answer (`get_many`, as the function without the Extensions API does).
    pub batch_answer_first_probability: f64,
    /// The readers' pace while writers run (`CHECKER_READS_PER_WRITE`).
    pub reads_per_write: u64,
    /// Of the writes to an existing item.
    pub delete_probability: f64,
    /// A writer's pause between its writes, for runs that last by time rather than by
    /// operations (the game day): a long run's history stays small enough to check.
    pub write_pause: Option<Duration>,
    pub lease: Duration,
    pub lease_wait: Duration,
    /// Of the readers' `GetItem`s: pause after the table answered, before the fill.
    /// Also of their `BatchGetItem`s, where the pause holds back every fill of the batch.
    pub slow_read_probability: f64,
    pub slow_read_pause: (Duration, Duration),
    pub max_batch: usize,
    /// Per delivered batch: first re-deliver an earlier, acknowledged batch.
    pub duplicate_probability: f64,
    /// Per delivered batch: apply a prefix of its ops, then fail.
    pub partial_failure_probability: f64,
    /// Per failed batch: retry it as two halves.
    pub bisect_probability: f64,
    pub herds: usize,
    pub herd_size: usize,
    pub max_duration: Duration,
    /// How the cache loses its data once, at 45% of the run (a cluster's nodes are not
    /// restarted empty: its runs use [`DataLoss::Flushall`]).
    pub data_loss: DataLoss,
    /// Right after the data loss, re-deliver every pooled acknowledged batch from before it, in
    /// order (an event source mapping resuming from an older checkpoint). The loss forgot
    /// `{key}:ver` and the slots' epochs, so this is what the cache's data loss rule must survive
    /// (`old_records_replayed_after_a_restart`, `no_violations_after_a_flushall`). Single
    /// duplicates are drawn from all acknowledged batches, before or after the loss, either way.
    pub replay_after_data_loss: bool,
    /// Issue 20: every node full, evicting throughout the writes (`MemoryPressure`).
    pub memory_pressure: Option<MemoryPressure>,
}

/// A node kept full (`maxmemory`, the template's `volatile-ttl`): filled with ballast until it
/// evicts before the run, then ballast keys that outlive the documents and positions (a TTL
/// past the positions' 25 h, short of the leases' 26 h: `ballast.rs`) are written throughout
/// the writes, so each one evicts the product's nearest-expiry keys, as a full node with a
/// larger catalogue does. The ballast stops when the writers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPressure {
    /// Each node's `maxmemory`, in bytes: what Redis uses empty, with the 16,384 epoch keys
    /// (no TTL, never evicted), and a little room.
    pub maxmemory: u64,
    /// One ballast key of this many bytes...
    pub ballast_bytes: usize,
    /// ... every this often.
    pub ballast_every: Duration,
    /// Every ballast key still there is read again (`TOUCH`) after each new one, so that under
    /// `volatile-lru` (serverless) the ballast is never what was least recently used; under
    /// `volatile-ttl` its TTL does that (`ballast.rs`).
    pub hot_ballast: bool,
}

impl MemoryPressure {
    /// A single node: 4 MB, of which Redis and the epoch keys use about 2.5.
    pub fn full() -> Self {
        Self {
            maxmemory: 4 * 1024 * 1024,
            // 320 KB/s: each key evicts every product key its sample finds nearer its expiry
            // (the run's few kilobytes of documents and positions are gone within seconds),
            // at a rate that leaves the machine's two cores to the rest of the suite.
            ballast_bytes: 16 * 1024,
            ballast_every: Duration::from_millis(50),
            hot_ballast: false,
        }
    }

    /// An ElastiCache Serverless stand-in's primary (`Deployment::Serverless`): 6 MB, the
    /// cache's storage maximum (`ServerlessOptions::max_memory`), since its replica's backlog
    /// counts as a cluster node's does. Its policy is `volatile-lru`, so what goes is what was
    /// used least recently, not what expires first: the ballast is kept hot
    /// ([`MemoryPressure::hot_ballast`]), the traffic of a bigger catalogue's busier products,
    /// and the run's keys are what a full cache evicts once they are a second idle.
    pub fn full_serverless() -> Self {
        Self {
            maxmemory: 6 * 1024 * 1024,
            // Twice the node's pace: each ballast key is one round of `volatile-lru`'s sampling,
            // and the product's idle keys are found (and evicted) a few samples at a time.
            ballast_every: Duration::from_millis(25),
            hot_ballast: true,
            ..Self::full()
        }
    }

    /// A cluster node with a replica: 6 MB, since its replication backlog (1 MB) and its
    /// clients' buffers count against `maxmemory` too (at 4 MB a primary had nothing left to
    /// evict and answered OOM).
    pub fn full_cluster_node() -> Self {
        Self {
            maxmemory: 6 * 1024 * 1024,
            ..Self::full()
        }
    }
}

/// Where the cache lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// One `redis-server`, no replicas.
    Single,
    /// A Redis Cluster of 3 primaries with 1 replica each (`cluster-node-timeout` 1 s), as
    /// ElastiCache deploys with Multi-AZ: at a third of the run a `CLUSTER FAILOVER` on one
    /// shard's replica, at two thirds another shard's primary killed outright (optionally after
    /// its replica's link was cut, so the promoted replica lacks its newest writes), and revived
    /// as a replica once the cluster has promoted its replica.
    Cluster(Cluster),
    /// An ElastiCache Serverless cache (`local_stack::services::ServerlessCache`): one TLS
    /// endpoint answering as a one-shard cluster over a primary `redis-server` and its replica,
    /// the unavailable commands refused, `volatile-lru`. Every function connects as production
    /// does there: `REDIS_CACHE_TYPE=serverless`, `rediss://` with the stand-in's CA, an IAM
    /// user whose tokens (signed with the run's fake credentials) the stand-in checks, no
    /// replica confirmation (`WAIT` is refused), hits from the primary endpoint. Its data loss
    /// is a `FLUSHALL` (which AWS offers there); the checker's own looks (`KEYS`, the ballast,
    /// `INFO`, the `FLUSHALL`) go straight to the primary `redis-server`, as an observer.
    Serverless,
}

/// The product's settings for a cluster, and how the kill is staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    /// `REDIS_CONFIRM_REPLICAS`: replicas of every primary that must hold a batch's writes
    /// before it is acknowledged.
    pub confirm_replicas: u32,
    /// `REDIS_READ_FROM_REPLICAS`: hits' `GET`s go to replicas.
    pub read_from_replicas: bool,
    /// How long the primary runs with its replica's link cut before it is killed; `None` kills
    /// it with the link up (its replica then trails it by at most a moment).
    pub cut_before_kill: Option<Duration>,
    /// Every function connects as the least-privilege user of `product_cache::acl::rules`,
    /// which every node knows from its start (a revived node too).
    pub least_privilege: bool,
    /// Instead of the failover and the kill: a managed cluster's ordinary bad days, in sequence.
    pub game_day: Option<GameDay>,
}

/// A game day (issue 17): healthy, then a primary killed and left down (its shard serves from
/// the promoted replica alone, a primary with no replica), then it comes back as a replica and
/// syncs, then another primary stalls (SIGSTOP) and is failed over meanwhile, then everything
/// is restored and healthy again. Writers and readers go on throughout; the run's operation
/// budget ends once the last healthy stretch is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GameDay {
    /// Each healthy stretch: before the kill, between the phases and at the end.
    pub healthy: Duration,
    /// How long the killed primary stays down (`CHECKER_GAME_DAY_DOWN_SECS`).
    pub down: Duration,
    /// How long the stalled node stays stalled (`CHECKER_GAME_DAY_STALL_SECS`).
    pub stall: Duration,
}

impl GameDay {
    /// The issue's: 60 s down, 10 s stalled.
    pub fn issue_17() -> Self {
        Self {
            healthy: Duration::from_secs(5),
            down: Duration::from_secs(env_u64("CHECKER_GAME_DAY_DOWN_SECS").unwrap_or(60)),
            stall: Duration::from_secs(env_u64("CHECKER_GAME_DAY_STALL_SECS").unwrap_or(10)),
        }
    }
}

impl Cluster {
    /// Every batch confirmed by the one replica of each primary, hits from primaries.
    pub fn confirmed() -> Self {
        Self {
            confirm_replicas: 1,
            read_from_replicas: false,
            cut_before_kill: None,
            least_privilege: false,
            game_day: None,
        }
    }
}

/// How the chaos step empties the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLoss {
    /// `redis-server` restarted on the same port, empty (no persistence): connections drop.
    Restart,
    /// `FLUSHALL` through a plain connection (to every primary of a cluster): the servers keep
    /// running, their connections stay up and their uptime keeps growing, so only the data
    /// itself can tell.
    Flushall,
}

/// Fractions of the run's operations after which each function uses the other version
/// attribute setting.
#[derive(Debug, Clone, Copy)]
pub struct FlipAt {
    pub invalidator: f64,
    pub readers: f64,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
    )
}

impl Config {
    pub fn new(name: &'static str, mode: InvalidationMode) -> Self {
        let ops = env_u64("CHECKER_OPS").unwrap_or(5_000);
        let lease = Duration::from_millis(150);
        let readers = 8;
        Self {
            name,
            mode,
            guards: Guards::default(),
            deployment: Deployment::Single,
            engine: Engine::Redis,
            version_attribute: None,
            flip_version_attribute: None,
            ops,
            seed: env_u64("CHECKER_SEED").unwrap_or(0x5EED_C0DE),
            items: 16,
            writers: 4,
            readers,
            // One reader in four (`CHECKER_BATCH_READERS=0`: none).
            batch_readers: env_u64("CHECKER_BATCH_READERS").map_or(readers / 4, |n| n as usize),
            batch_ids: (5, 20),
            batch_answer_first_probability: 0.5,
            reads_per_write: env_u64("CHECKER_READS_PER_WRITE").unwrap_or(4),
            delete_probability: 0.08,
            write_pause: None,
            lease,
            lease_wait: lease * 3,
            // Refresh mode misses rarely: make its few table reads slow more often.
            slow_read_probability: if mode == InvalidationMode::Delete {
                0.08
            } else {
                0.2
            },
            slow_read_pause: (lease + lease / 5, lease * 3),
            max_batch: 40,
            duplicate_probability: 0.08,
            partial_failure_probability: 0.08,
            bisect_probability: 0.5,
            herds: (ops / 100_000).clamp(3, 10) as usize,
            herd_size: 200,
            data_loss: DataLoss::Restart,
            replay_after_data_loss: false,
            memory_pressure: None,
            max_duration: Duration::from_secs(
                env_u64("CHECKER_MAX_SECS").unwrap_or_else(|| (ops / 2_000).max(90)),
            ),
        }
    }

    /// The game day on a cluster of 3 primaries with a replica each, every batch confirmed by
    /// the replicas there are, under the least-privilege user and the default Redis timeout.
    /// It lasts by time: writers pace themselves, and the operation budget ends with the game
    /// day (no data loss, no herds: the run is about availability).
    pub fn game_day(name: &'static str, mode: InvalidationMode) -> Self {
        let game_day = GameDay::issue_17();
        let lasts = game_day.healthy * 4 + game_day.down + game_day.stall;
        Self {
            ops: u64::MAX / 2,
            herds: 0,
            write_pause: Some(Duration::from_millis(20)),
            max_duration: lasts + Duration::from_secs(120),
            ..Self::on_cluster(
                name,
                mode,
                Cluster {
                    least_privilege: true,
                    game_day: Some(game_day),
                    ..Cluster::confirmed()
                },
            )
        }
    }

    /// A run on an ElastiCache Serverless stand-in ([`Deployment::Serverless`]), its data loss
    /// a `FLUSHALL`, over 64 items rather than 16: each changes about once a second rather than
    /// a few times, so under `volatile-lru` (which evicts what was used least recently, at a
    /// second's resolution) a key between two changes is idle long enough to be evicted, as a
    /// bigger catalogue's quieter products are.
    pub fn on_serverless(name: &'static str, mode: InvalidationMode) -> Self {
        Self {
            deployment: Deployment::Serverless,
            data_loss: DataLoss::Flushall,
            items: 64,
            ..Self::new(name, mode)
        }
    }

    /// A run on a cluster with replicas: the failovers of [`Deployment::Cluster`], and its data
    /// loss a `FLUSHALL` of every primary.
    pub fn on_cluster(name: &'static str, mode: InvalidationMode, cluster: Cluster) -> Self {
        Self {
            deployment: Deployment::Cluster(cluster),
            data_loss: DataLoss::Flushall,
            ..Self::new(name, mode)
        }
    }
}
