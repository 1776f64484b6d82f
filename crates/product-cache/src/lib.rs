//! A cache-aside layer for a DynamoDB product table, kept fresh from the table's stream.
//!
//! Two Lambda functions share this library: the read path answers `GET /products/{id}` from
//! Redis and fills misses from DynamoDB; the invalidator applies the table's DynamoDB Stream to
//! Redis so a changed item is not served stale until its TTL runs out.
//!
//! # Layout
//! - [`config`]: settings from environment variables, validated at cold start.
//! - [`id`]: [`id::ProductId`], the parsed product id, and the cache key it maps to.
//! - [`document`]: the one mapping from a DynamoDB item to the cached JSON document.
//! - [`cache`]: Redis access with per-operation timeouts, and pipelined batches.
//! - [`secrets`]: the Redis AUTH token from Secrets Manager.
//! - [`store`]: the table (`GetItem`).
//! - [`read`]: the read path and its HTTP edge.
//! - [`invalidate`]: stream records to cache deletes or refreshes, with partial batch failures.

pub mod cache;
pub mod config;
pub mod document;
pub mod id;
pub mod invalidate;
pub mod read;
pub mod secrets;
pub mod store;

/// Why a function could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("invalid Redis configuration")]
    Cache(#[from] cache::CacheError),
}

/// The cache the settings describe: single node or cluster, with the AUTH token from Secrets
/// Manager when one is configured. Connects lazily, so a down cache does not stop a cold start.
pub async fn connect_cache(
    redis: &config::RedisSettings,
    timeout: std::time::Duration,
    sdk: &aws_config::SdkConfig,
) -> Result<cache::RedisCache, StartupError> {
    let url = match &redis.auth_secret_arn {
        Some(arn) => {
            let client = aws_sdk_secretsmanager::Client::new(sdk);
            let token = secrets::fetch_token(&client, arn).await?;
            secrets::with_password(&redis.url, &token)?
        }
        None => redis.url.clone(),
    };
    Ok(if redis.cluster {
        cache::RedisCache::cluster(&url, timeout)?
    } else {
        cache::RedisCache::new(&url, timeout)?
    })
}

/// The read function's handler state, from the environment.
pub async fn read_path_from_env(
) -> Result<read::ReadPath<cache::RedisCache, store::DynamoStore>, StartupError> {
    let settings = config::ReadSettings::from_env()?;
    let sdk = sdk_config().await;
    let cache = connect_cache(&settings.redis, settings.cache.redis_timeout, &sdk).await?;
    let store = store::DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        &settings.table_name,
        &settings.cache.key_attribute,
        settings.cache.key_type,
        settings.consistent_read,
    );
    Ok(read::ReadPath::new(cache, store, settings.cache))
}

/// The invalidator function's handler state, from the environment.
pub async fn invalidator_from_env(
) -> Result<invalidate::Invalidator<cache::RedisCache>, StartupError> {
    let settings = config::InvalidatorSettings::from_env()?;
    let sdk = sdk_config().await;
    let cache = connect_cache(&settings.redis, settings.cache.redis_timeout, &sdk).await?;
    Ok(invalidate::Invalidator::new(
        cache,
        settings.mode,
        settings.cache,
    ))
}

/// Logs a start-up failure and turns it into the runtime's error. The message names the
/// variable or secret at fault; the Debug form `main` would otherwise print reads badly in
/// CloudWatch.
pub fn startup_failed(e: StartupError) -> Box<dyn std::error::Error + Send + Sync> {
    tracing::error!("{e}");
    e.to_string().into()
}

/// Loads the AWS SDK configuration from the environment (region, credentials and endpoint
/// overrides such as `AWS_ENDPOINT_URL_DYNAMODB`).
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}
