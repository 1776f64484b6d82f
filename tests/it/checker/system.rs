//! The system under test, fresh for each run: a `redis-server`, a table with its stream on the
//! shared moto, and the one place the checker builds the product's parts over them (cache
//! client, table store, invalidator, read path), so every actor gets them built the same way and
//! a change to how they are built is made here once.

use std::time::Duration;

use local_stack::services::RedisServer;
use local_stack::stream::StreamReader;
use product_cache::cache::{Cache, RedisCache};
use product_cache::config::{CacheSettings, InvalidationMode};
use product_cache::id::KeyType;
use product_cache::invalidate::Invalidator;
use product_cache::read::ReadPath;
use product_cache::store::{DynamoStore, ProductStore};

use super::config::Config;
use crate::support::{dynamo_store, moto_endpoint, redis_cache, unique_table};

pub struct Sut {
    pub redis_url: String,
    pub sdk: aws_config::SdkConfig,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub table: String,
    pub stream: StreamReader,
    pub mode: InvalidationMode,
    /// The feeder's, the readers' and the replay's settings; herds use longer leases.
    pub settings: CacheSettings,
    /// The same with the version attribute flipped (`version` if `settings` has none, else
    /// none), for runs that flip it mid-run.
    pub flipped: CacheSettings,
}

impl Sut {
    /// The Redis server comes back apart from the rest: chaos restarts it while the actors use
    /// the rest, and dropping it ends the run's Redis.
    pub async fn start(cfg: &Config) -> (RedisServer, Self) {
        let redis = RedisServer::start().await.expect("redis-server starts");
        let redis_url = redis.url();
        let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let table = unique_table("checker");
        let stream_arn =
            local_stack::table::ensure_table(&dynamodb, &table, "productId", KeyType::S)
                .await
                .expect("table created");
        let stream = StreamReader::new(aws_sdk_dynamodbstreams::Client::new(&sdk), stream_arn);
        let settings = CacheSettings {
            lease: cfg.lease,
            lease_wait: cfg.lease_wait,
            redis_timeout: Duration::from_millis(250),
            version_attribute: cfg.version_attribute.clone(),
            guards: cfg.guards,
            ..CacheSettings::default()
        };
        let flipped = CacheSettings {
            version_attribute: match cfg.version_attribute {
                None => Some("version".into()),
                Some(_) => None,
            },
            ..settings.clone()
        };
        let sut = Self {
            redis_url,
            sdk,
            dynamodb,
            table,
            stream,
            mode: cfg.mode,
            settings,
            flipped,
        };
        (redis, sut)
    }

    /// Declares the run's fresh Redis empty, as a long-running deployment's epochs are long past.
    pub async fn declare_empty(&self) {
        let cache = self.cache(&self.settings).await;
        cache.declare_empty().await.expect("epochs declared");
    }

    /// A client of its own for each user, as each function instance has.
    pub async fn cache(&self, settings: &CacheSettings) -> RedisCache {
        redis_cache(&self.redis_url, settings).await
    }

    /// Consistent reads: invariant 3 compares the cache with the table as it is.
    pub fn store(&self) -> DynamoStore {
        dynamo_store(&self.sdk, &self.table, &self.settings)
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

    /// A plain connection, to look at the cache without the product's code in between.
    pub async fn redis_connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.clone())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}
