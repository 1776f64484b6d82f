//! `pcache dev --cache serverless`: a local ElastiCache Serverless stand-in
//! (`local_stack::services::ServerlessCache`) for the stack, and the functions' settings for it
//! as the template gives them on serverless: `REDIS_CACHE_TYPE=serverless`, the `rediss://`
//! endpoint with its CA (`REDIS_CA_FILE`), an IAM user (`REDIS_IAM_USER`,
//! `REDIS_IAM_CACHE_NAME`; the local stack's fake credentials sign the tokens, which the
//! stand-in checks), no replica confirmation (`REDIS_CONFIRM_REPLICAS=0`: serverless has no
//! `WAIT`).

use std::time::Duration;

use local_stack::services::{Auth, ServerlessCache, ServerlessOptions};
use product_cache::cache::RedisCache;
use product_cache::config::{CacheSettings, RedisSettings};

use crate::commands::Error;

/// The IAM-enabled user the functions connect as.
pub const IAM_USER: &str = "product-cache";
/// The serverless cache's name, as its tokens are signed for (lowercase, as ElastiCache keeps it).
pub const CACHE_NAME: &str = "local-serverless";

/// How long the first connection may take to form, on a busy machine.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// The running stand-in, and how the functions reach it.
pub struct LocalServerless {
    /// Stops the front and both servers when dropped.
    pub cache: ServerlessCache,
    /// The functions' variables for it, as the template sets them on serverless.
    pub env: Vec<(String, String)>,
    /// The settings those variables give, as the functions read them.
    pub redis: RedisSettings,
}

impl LocalServerless {
    /// Starts the stand-in, IAM authentication on, and declares it empty (as the stack does a
    /// `redis-server` it starts): refreshes write from the first record on.
    pub async fn start(settings: &CacheSettings) -> Result<Self, Error> {
        // The local stack's SDK: its Region is the one the tokens are signed for. Signing calls
        // no endpoint, so none is needed here.
        let sdk = local_stack::table::local_sdk_config("http://127.0.0.1:9").await;
        let region = sdk
            .region()
            .map(|r| r.as_ref().to_owned())
            .ok_or("the local SDK configuration has no Region")?;
        let cache = ServerlessCache::start(ServerlessOptions {
            auth: Auth::Iam {
                user: IAM_USER.into(),
                cache_name: CACHE_NAME.into(),
                region,
            },
            ..ServerlessOptions::default()
        })
        .await
        .map_err(|e| format!("starting the serverless stand-in: {e}"))?;
        let env: Vec<(String, String)> = [
            ("REDIS_URL", cache.url()),
            ("REDIS_CACHE_TYPE", "serverless".into()),
            ("REDIS_CA_FILE", cache.ca_file().display().to_string()),
            ("REDIS_IAM_USER", IAM_USER.into()),
            ("REDIS_IAM_CACHE_NAME", CACHE_NAME.into()),
            ("REDIS_CONFIRM_REPLICAS", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let redis = RedisSettings::from_source(env.as_slice())?;
        let client = RedisCache::from_settings(&redis, settings, &sdk).await?;
        // The client connects in the background: its first calls may find it still connecting.
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            match client.declare_empty().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("declaring the serverless stand-in empty: {e}").into())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(Self { cache, env, redis })
    }

    /// The banner's Redis lines: the endpoints, the authentication, the servers behind them,
    /// and the variables other `pcache` commands need to reach it.
    pub fn banner_lines(&self) -> String {
        let env: Vec<String> = self
            .env
            .iter()
            .filter(|(k, _)| k != "REDIS_URL" && k != "REDIS_CONFIRM_REPLICAS")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "\x20 Redis       a local ElastiCache Serverless stand-in (started here)\n\
             \x20             primary endpoint {primary}, reader endpoint {reader}\n\
             \x20             TLS (CA {ca}), IAM user {IAM_USER} of serverless cache {CACHE_NAME}\n\
             \x20             over redis-server :{backend} (primary) and :{replica} (replica)\n\
             \x20             other commands on it: {env} scripts/run.sh inspect",
            primary = self.cache.url(),
            reader = self.cache.reader_url(),
            ca = self.cache.ca_file().display(),
            backend = self.cache.backend().port(),
            replica = self.cache.replica().port(),
            env = env.join(" "),
        )
    }
}

/// `banner` with its Redis line replaced by `redis` (the lines of [`LocalServerless`]).
pub fn with_redis_lines(banner: &str, redis: &str) -> String {
    let mut replaced = false;
    let lines: Vec<&str> = banner
        .lines()
        .flat_map(|line| {
            if !replaced && line.trim_start().starts_with("Redis ") {
                replaced = true;
                redis.lines().collect::<Vec<_>>()
            } else {
                vec![line]
            }
        })
        .collect();
    let mut out = lines.join("\n");
    if !replaced {
        out = format!("{out}\n{redis}");
    }
    out
}
