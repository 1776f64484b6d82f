//! `GET /products/{id}` behind API Gateway (HTTP API, payload v2).

use lambda_http::{service_fn, Error};
use product_cache::cache::RedisCache;
use product_cache::config::ReadSettings;
use product_cache::read::{handle_request, ReadPath};
use product_cache::store::DynamoStore;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_http::tracing::init_default_subscriber();
    // Clients are built once per execution environment and reused by every invocation.
    // The message names the variable; the Debug form `main` would print does not read well in
    // CloudWatch, so log the Display form and return it as the error.
    let settings = ReadSettings::from_env().map_err(|e| {
        tracing::error!("{e}");
        Error::from(e.to_string())
    })?;
    let cache = RedisCache::new(&settings.redis_url, settings.cache.redis_timeout)?;
    let store = DynamoStore::new(
        product_cache::dynamodb_client().await,
        &settings.table_name,
        &settings.cache.key_attribute,
        settings.cache.key_type,
        settings.consistent_read,
    );
    let read = ReadPath::new(cache, store, settings.cache);
    lambda_http::run(service_fn(|req| handle_request(&read, req))).await
}
