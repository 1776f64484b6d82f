//! Applies the table's DynamoDB Stream to the cache (event source mapping with
//! `ReportBatchItemFailures`).

use lambda_runtime::{service_fn, Error, LambdaEvent};
use product_cache::cache::RedisCache;
use product_cache::config::InvalidatorSettings;
use product_cache::invalidate::Invalidator;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // The message names the variable; the Debug form `main` would print does not read well in
    // CloudWatch, so log the Display form and return it as the error.
    let settings = InvalidatorSettings::from_env().map_err(|e| {
        tracing::error!("{e}");
        Error::from(e.to_string())
    })?;
    let cache = RedisCache::new(&settings.redis_url, settings.cache.redis_timeout)?;
    let invalidator = Invalidator::new(cache, settings.mode, settings.cache);
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async {
        Ok::<_, Error>(invalidator.handle(event.payload).await)
    }))
    .await
}
