//! The system under test, fresh for each run: Redis (one `redis-server`, or a cluster of three
//! primaries with a replica each; `valkey-server`s with [`Config::engine`]; or an ElastiCache
//! Serverless stand-in over a primary and its replica), a table with its
//! stream on the shared moto, and the one place the checker builds the product's parts over them
//! (cache client, table store, invalidator, read path) and its own plain connections to look at
//! the cache, so every actor gets them built the same way and a change to how they are built is
//! made here once.

use std::time::Duration;

use local_stack::services::{
    Auth, Engine, RedisCluster, RedisServer, ServerlessCache, ServerlessOptions,
};
use local_stack::stream::StreamReader;
use product_cache::cache::{Cache, RedisCache};
use product_cache::config::{
    AwsTimeouts, CacheSettings, CacheType, IamSettings, InvalidationMode, RedisSettings,
};
use product_cache::id::KeyType;
use product_cache::invalidate::Invalidator;
use product_cache::read::ReadPath;
use product_cache::store::{DynamoStore, ProductStore};

use super::config::{Cluster, Config, DataLoss, Deployment};
use crate::support::{checker_moto_endpoint, dynamo_store_with, unique_table};

/// The run's Redis processes. Chaos restarts, fails over or kills them while the actors use the
/// rest of the system; dropping them ends the run's Redis.
pub enum Redis {
    Single(Box<RedisServer>),
    Cluster(RedisCluster),
    Serverless(Box<ServerlessCache>),
}

/// The functions' user on a least-privilege run (`Cluster::least_privilege`), and its password
/// as an ACL rule.
const LEAST_PRIVILEGE_USER: &str = "product-cache";
const LEAST_PRIVILEGE_PASS: &str = ">checker-least-privilege";

/// The serverless run's IAM user, cache name and Region: the run's SDK's (moto's), whose fake
/// credentials sign the functions' tokens.
const SERVERLESS_IAM_USER: &str = "product-cache-iam";
const SERVERLESS_CACHE_NAME: &str = "product-cache-checker";
const SERVERLESS_REGION: &str = "us-east-1";

pub struct Sut {
    pub sdk: aws_config::SdkConfig,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub table: String,
    pub stream: StreamReader,
    pub mode: InvalidationMode,
    /// How every function instance reaches Redis: the URL (a cluster's first node, standing in
    /// for the configuration endpoint), and for a cluster its confirmation and replica reads.
    pub redis: RedisSettings,
    /// Every node's URL, for the checker's own looks at a cluster (not through any one node).
    pub nodes: Vec<String>,
    /// Whether the checker's own looks go to a cluster (`nodes`) or to one plain node: on
    /// serverless, its primary `redis-server` behind the front, not the endpoint the functions
    /// use (which refuses `KEYS` and wants TLS and a token).
    pub look_cluster: bool,
    /// The one node's URL of `look_cluster == false`.
    pub look_url: String,
    /// The feeder's, the readers' and the replay's settings; herds use longer leases.
    pub settings: CacheSettings,
    /// The same with the version attribute flipped (`version` if `settings` has none, else
    /// none), for runs that flip it mid-run.
    pub flipped: CacheSettings,
}

impl Sut {
    /// Redis comes back apart from the rest: chaos restarts, fails over and kills its nodes
    /// while the actors use the rest.
    pub async fn start(cfg: &Config) -> (Redis, Self) {
        let (redis, settings, nodes) = match cfg.deployment {
            Deployment::Single => {
                // Arguments, not CONFIG SET: a restarted server keeps them.
                let full = full_args(cfg);
                let full: Vec<&str> = full.iter().map(String::as_str).collect();
                let server = RedisServer::start_engine(cfg.engine, &full)
                    .await
                    .expect("the node starts");
                let url = server.url();
                (
                    Redis::Single(Box::new(server)),
                    RedisSettings::new(&url),
                    vec![url],
                )
            }
            Deployment::Cluster(cluster) => {
                assert_ne!(
                    cfg.data_loss,
                    DataLoss::Restart,
                    "a cluster's data loss is a FLUSHALL of every primary"
                );
                // The user is part of every node's command line, so a node killed and started
                // again knows it too.
                let rules = product_cache::acl::rules(&CacheSettings::default().key_prefix);
                let mut user = vec!["--user", LEAST_PRIVILEGE_USER, "on", LEAST_PRIVILEGE_PASS];
                user.extend(rules.split_whitespace());
                let mut extra: Vec<&str> = if cluster.least_privilege {
                    user
                } else {
                    Vec::new()
                };
                let full = full_args(cfg);
                extra.extend(full.iter().map(String::as_str));
                let nodes = RedisCluster::start_engine(cfg.engine, 3, 1, &extra)
                    .await
                    .expect("redis cluster with replicas starts");
                let url = if cluster.least_privilege {
                    let password = LEAST_PRIVILEGE_PASS.trim_start_matches('>');
                    nodes.url().replacen(
                        "redis://",
                        &format!("redis://{LEAST_PRIVILEGE_USER}:{password}@"),
                        1,
                    )
                } else {
                    nodes.url()
                };
                let settings = RedisSettings {
                    cluster: true,
                    confirm_replicas: cluster.confirm_replicas,
                    read_from_replicas: cluster.read_from_replicas,
                    ..RedisSettings::new(url)
                };
                let urls = nodes
                    .ports()
                    .iter()
                    .map(|p| format!("redis://127.0.0.1:{p}"))
                    .collect();
                (Redis::Cluster(nodes), settings, urls)
            }
            Deployment::Serverless => {
                assert_ne!(
                    cfg.data_loss,
                    DataLoss::Restart,
                    "a serverless cache's data loss is a FLUSHALL"
                );
                assert_eq!(
                    cfg.engine,
                    Engine::Redis,
                    "the serverless stand-in runs redis-server"
                );
                let cache = ServerlessCache::start(ServerlessOptions {
                    auth: Auth::Iam {
                        user: SERVERLESS_IAM_USER.into(),
                        cache_name: SERVERLESS_CACHE_NAME.into(),
                        region: SERVERLESS_REGION.into(),
                    },
                    max_memory: cfg.memory_pressure.map(|full| full.maxmemory),
                    ..ServerlessOptions::default()
                })
                .await
                .expect("the serverless stand-in starts");
                // As the template configures the functions on serverless.
                let settings = RedisSettings {
                    cluster: true,
                    cache_type: CacheType::Serverless,
                    ca_file: Some(cache.ca_file().to_path_buf()),
                    iam: Some(IamSettings {
                        user_id: SERVERLESS_IAM_USER.into(),
                        cache: SERVERLESS_CACHE_NAME.into(),
                        serverless: true,
                    }),
                    confirm_replicas: 0,
                    read_from_replicas: false,
                    ..RedisSettings::new(cache.url())
                };
                let backend = cache.backend().url();
                (Redis::Serverless(Box::new(cache)), settings, vec![backend])
            }
        };
        let (look_cluster, look_url) = match cfg.deployment {
            Deployment::Cluster(_) => (true, settings.url.clone()),
            Deployment::Single | Deployment::Serverless => (false, nodes[0].clone()),
        };
        let sdk = local_stack::table::local_sdk_config(checker_moto_endpoint()).await;
        if cfg.deployment == Deployment::Serverless {
            // Tokens signed for another Region would be refused.
            assert_eq!(sdk.region().map(|r| r.as_ref()), Some(SERVERLESS_REGION));
        }
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let table = unique_table("checker");
        let stream_arn =
            local_stack::table::ensure_table(&dynamodb, &table, "productId", KeyType::S)
                .await
                .expect("table created");
        let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);
        let cache_settings = CacheSettings {
            lease: cfg.lease,
            lease_wait: cfg.lease_wait,
            // The game day runs at the functions' default: what a stall costs there is what it
            // is about. Other runs allow a loaded machine more.
            redis_timeout: match cfg.deployment {
                Deployment::Cluster(Cluster {
                    game_day: Some(_), ..
                }) => CacheSettings::default().redis_timeout,
                _ => Duration::from_millis(250),
            },
            version_attribute: cfg.version_attribute.clone(),
            guards: cfg.guards,
            ..CacheSettings::default()
        };
        let flipped = CacheSettings {
            version_attribute: match cfg.version_attribute {
                None => Some("version".into()),
                Some(_) => None,
            },
            ..cache_settings.clone()
        };
        let sut = Self {
            sdk,
            dynamodb,
            table,
            stream,
            mode: cfg.mode,
            redis: settings,
            nodes,
            look_cluster,
            look_url,
            settings: cache_settings,
            flipped,
        };
        (redis, sut)
    }

    /// Declares the run's fresh Redis empty, as a long-running deployment's epochs are long past.
    pub async fn declare_empty(&self) {
        // Setup, not the run: 16,384 keys, a pipeline per slot on a cluster, given more than
        // the game day's default timeout allows a machine busy with another run.
        let setup = CacheSettings {
            redis_timeout: Duration::from_secs(1),
            ..self.settings.clone()
        };
        let cache = self.cache(&setup).await;
        // Tried again until it lands: on serverless through the stand-in's TLS front, and on a
        // loaded machine, it can outlast the timeout, or find the client still connecting.
        crate::support::declared_empty(&cache).await;
    }

    /// A client of its own for each user, as each function instance has, built the way the
    /// functions build theirs (with the test's guards, which only the `test-support` feature
    /// lets a test switch off).
    pub async fn cache(&self, settings: &CacheSettings) -> RedisCache {
        RedisCache::from_settings(&self.redis, settings, &self.sdk)
            .await
            .expect("a valid Redis URL")
    }

    /// Consistent reads: invariant 3 compares the cache with the table as it is. With time to
    /// spare for each call: the checker counts what the table answers, it does not time it, and
    /// its moto answers slowly on a machine busy with other runs (a clean-clone CI run of the
    /// game day, at half its usual pace, had reads fail on the functions' 1 s attempt timeout,
    /// and "no read failed" is about the cache's failovers, which only ever bypass).
    pub fn store(&self) -> DynamoStore {
        let table_timeouts = AwsTimeouts {
            attempt: Duration::from_secs(10),
            operation: Duration::from_secs(20),
        };
        dynamo_store_with(&self.sdk, &self.table, &self.settings, table_timeouts)
    }

    pub fn invalidator<C: Cache>(&self, cache: C, settings: &CacheSettings) -> Invalidator<C> {
        Invalidator::new(cache, self.mode, settings.clone())
    }

    pub fn read_path<C: Cache, S: ProductStore>(
        &self,
        cache: C,
        store: S,
        settings: &CacheSettings,
    ) -> ReadPath<C, S> {
        ReadPath::new(cache, store, settings.clone())
    }

    /// A connection of the checker's own, to look at the cache without the product's code in
    /// between: on a cluster it routes each key to its slot's primary (never a replica), and
    /// `KEYS` to every primary; on serverless it is a plain connection to the primary
    /// `redis-server` behind the endpoint.
    pub async fn redis_connection(&self) -> Look {
        look(self.look_cluster, &self.look_url, &self.nodes)
            .await
            .expect("redis connection")
    }
}

/// A connection like [`Sut::redis_connection`]'s, to `url` (a single node) or `nodes` (a
/// cluster's), or the error of making it.
pub async fn look(cluster: bool, url: &str, nodes: &[String]) -> redis::RedisResult<Look> {
    if cluster {
        let conn = redis::cluster::ClusterClient::new(nodes.to_vec())?
            .get_async_connection()
            .await?;
        Ok(Look::Cluster(conn))
    } else {
        let conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Look::Single(conn))
    }
}

/// The checker's connection to one node or to a cluster ([`Sut::redis_connection`]).
#[derive(Clone)]
pub enum Look {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Look {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Look::Single(c) => c.req_packed_command(cmd),
            Look::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Look::Single(c) => c.req_packed_commands(cmd, offset, count),
            Look::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Look::Single(c) => c.get_db(),
            Look::Cluster(c) => c.get_db(),
        }
    }
}

/// The node arguments of a run under memory pressure: its `maxmemory` and the template's policy.
fn full_args(cfg: &Config) -> Vec<String> {
    match cfg.memory_pressure {
        Some(full) => vec![
            "--maxmemory".into(),
            full.maxmemory.to_string(),
            "--maxmemory-policy".into(),
            "volatile-ttl".into(),
        ],
        None => Vec::new(),
    }
}

/// A plain connection to one node (of a cluster), to flush it or to read what a replica holds.
pub async fn node_connection(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis node connection")
}
