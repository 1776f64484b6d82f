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
//! - [`store`]: the table (`GetItem`).
//! - [`read`]: the read path and its HTTP edge.
//! - [`invalidate`]: stream records to cache deletes or refreshes, with partial batch failures.

pub mod cache;
pub mod config;
pub mod document;
pub mod id;
pub mod invalidate;
pub mod read;
pub mod store;

/// Loads the AWS SDK configuration from the environment (region, credentials and endpoint
/// overrides such as `AWS_ENDPOINT_URL_DYNAMODB`) and builds a DynamoDB client.
pub async fn dynamodb_client() -> aws_sdk_dynamodb::Client {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    aws_sdk_dynamodb::Client::new(&config)
}
