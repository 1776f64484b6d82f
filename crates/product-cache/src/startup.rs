//! Building the functions' state from settings: the one place clients are made.
//!
//! The Lambda binaries, the command-line tool and the tests all build the system through these
//! functions, so what the tests run is wired the way the functions are (zero2prod's
//! `Application::build`). Clients are built once per process, outside any handler.

use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;

use crate::cache::RedisCache;
use crate::config::{AwsTimeouts, CacheSettings, InvalidatorSettings, ReadSettings, RedisSettings};
use crate::inspect::{InspectSettings, Inspector};
use crate::invalidate::Invalidator;
use crate::metrics::{MetricsSettings, Sink};
use crate::read::ReadPath;
use crate::store::DynamoStore;
use crate::{config, secrets};

/// Why a function could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error(transparent)]
    Iam(#[from] crate::iam::IamError),
    #[error("invalid Redis configuration")]
    Cache(#[from] crate::cache::CacheError),
    #[error("REDIS_CA_FILE {path}: cannot read it")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RedisCache {
    /// The cache the settings describe: single node or cluster, with the AUTH token from Secrets
    /// Manager when one is configured, or IAM authentication with tokens signed with the SDK's
    /// credentials. Connects lazily, so a down cache does not stop a cold start.
    pub async fn from_settings(
        redis: &RedisSettings,
        cache: &CacheSettings,
        sdk: &SdkConfig,
    ) -> Result<Self, StartupError> {
        // Settings built in code, not read from the environment, meet the same rules.
        if redis.cache_type == config::CacheType::Serverless {
            redis.serverless_rules()?;
        }
        let url = match &redis.auth_secret_arn {
            Some(arn) => {
                // Reading the token is part of connecting to Redis, and it holds up the cold
                // start: bounded by the connect budget, with a retry on a new connection
                // within it.
                let timeouts = AwsTimeouts {
                    attempt: redis.connect_timeout / 2,
                    operation: redis.connect_timeout,
                };
                let config = aws_sdk_secretsmanager::config::Builder::from(sdk)
                    .timeout_config(aws_timeouts(&timeouts))
                    .build();
                let client = aws_sdk_secretsmanager::Client::from_conf(config);
                let token = secrets::fetch_token(&client, arn).await?;
                secrets::with_password(&redis.url, &token)?
            }
            None => redis.url.clone(),
        };
        let root_cert = match &redis.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| StartupError::CaFile {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let options = crate::cache::Options {
            timeout: cache.redis_timeout,
            connect_timeout: redis.connect_timeout,
            root_cert,
            confirm: (redis.confirm_replicas > 0).then_some(crate::cache::Confirm {
                replicas: redis.confirm_replicas,
                timeout: redis.confirm_timeout,
            }),
            read_from_replicas: redis.read_from_replicas,
            breaker: redis.breaker,
            guards: cache.guards(),
            credentials: match &redis.iam {
                Some(iam) => Some(crate::iam::IamCredentials::from_sdk(iam, sdk)?),
                None => None,
            },
            tcp_keepalive: redis.tcp_keepalive,
            serverless: redis.cache_type == crate::config::CacheType::Serverless,
        };
        if options.serverless {
            tracing::info!(
                "cache: ElastiCache Serverless (no replica confirmation; positions without a \
                 TTL; replica reads, if on, from its reader endpoint)"
            );
        }
        Ok(if redis.cluster {
            RedisCache::cluster(&url, options)?
        } else {
            RedisCache::single(&url, options)?
        })
    }
}

impl DynamoStore {
    /// The table the read settings name, keyed and read the way they say.
    pub fn from_settings(settings: &ReadSettings, sdk: &SdkConfig) -> Self {
        DynamoStore::new(
            dynamodb_client(sdk, &settings.table_timeouts),
            &settings.table_name,
            &settings.cache.key_attribute,
            settings.cache.key_type,
            settings.consistent_read,
        )
    }
}

impl ReadPath<RedisCache, DynamoStore> {
    /// The read function's handler state.
    pub async fn build(settings: ReadSettings, sdk: &SdkConfig) -> Result<Self, StartupError> {
        let cache = RedisCache::from_settings(&settings.redis, &settings.cache, sdk).await?;
        let store = DynamoStore::from_settings(&settings, sdk);
        Ok(ReadPath::new(cache, store, settings.cache))
    }
}

impl Invalidator<RedisCache> {
    /// The invalidator function's handler state.
    pub async fn build(
        settings: InvalidatorSettings,
        sdk: &SdkConfig,
    ) -> Result<Self, StartupError> {
        let cache = RedisCache::from_settings(&settings.redis, &settings.cache, sdk).await?;
        Ok(Invalidator::new(cache, settings.mode, settings.cache))
    }
}

impl Inspector<DynamoStore> {
    /// The inspector's state: the read function's settings (the same Redis, table and key
    /// mapping), with strongly consistent reads whatever the read function uses.
    pub async fn build(
        mut settings: ReadSettings,
        inspect: InspectSettings,
        sdk: &SdkConfig,
    ) -> Result<Self, StartupError> {
        settings.consistent_read = true;
        let cache = RedisCache::from_settings(&settings.redis, &settings.cache, sdk).await?;
        let store = DynamoStore::from_settings(&settings, sdk);
        Ok(Inspector::new(cache, store, settings.cache, inspect))
    }
}

/// The inspector function's state, from the environment: the read function's variables and
/// `INSPECT_*`.
pub async fn inspector_from_env() -> Result<Inspector<DynamoStore>, StartupError> {
    let settings = ReadSettings::from_env()?;
    let inspect = InspectSettings::from_source(&crate::config::Env)?;
    let metrics = MetricsSettings::from_source(&crate::config::Env)?;
    Ok(Inspector::build(settings, inspect, &sdk_config().await)
        .await?
        .with_metrics(metrics, Sink::Stdout))
}

/// The read function's handler state, from the environment.
pub async fn read_path_from_env() -> Result<ReadPath<RedisCache, DynamoStore>, StartupError> {
    let settings = ReadSettings::from_env()?;
    let metrics = MetricsSettings::from_source(&crate::config::Env)?;
    Ok(ReadPath::build(settings, &sdk_config().await)
        .await?
        .with_metrics(metrics, Sink::Stdout))
}

/// The invalidator function's handler state, from the environment.
pub async fn invalidator_from_env() -> Result<Invalidator<RedisCache>, StartupError> {
    let settings = InvalidatorSettings::from_env()?;
    let metrics = MetricsSettings::from_source(&crate::config::Env)?;
    Ok(Invalidator::build(settings, &sdk_config().await)
        .await?
        .with_metrics(metrics, Sink::Stdout))
}

/// Logs a start-up failure and turns it into the runtime's error. The message names the
/// variable or secret at fault; the Debug form `main` would otherwise print reads badly in
/// CloudWatch.
pub fn startup_failed(e: StartupError) -> Box<dyn std::error::Error + Send + Sync> {
    tracing::error!("{e}");
    e.to_string().into()
}

/// `timeouts` as the SDK takes them: a bound on each attempt and on the whole call. The SDK's
/// connect timeout stays as the SDK configuration has it (3.1 s by default), within the attempt
/// timeout whenever that is shorter.
pub fn aws_timeouts(timeouts: &AwsTimeouts) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_attempt_timeout(timeouts.attempt)
        .operation_timeout(timeouts.operation)
        .build()
}

/// A DynamoDB client whose every call is bounded by `timeouts`: the read path's and the
/// inspector's table client, and the one for any tool that reads or writes the table.
pub fn dynamodb_client(sdk: &SdkConfig, timeouts: &AwsTimeouts) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::config::Builder::from(sdk)
        .timeout_config(aws_timeouts(timeouts))
        // The SDK's standard first backoff is up to a second, drawn at random: a reader whose
        // attempt ran out would wait that much again before its retry. DynamoDB's own SDKs start
        // at tens of milliseconds; a retry that must fit in `DYNAMODB_TIMEOUT_MS` wants the same.
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_initial_backoff(std::time::Duration::from_millis(25)),
        )
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// Loads the AWS SDK configuration from the environment (region, credentials and endpoint
/// overrides such as `AWS_ENDPOINT_URL_DYNAMODB`).
pub async fn sdk_config() -> SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}
