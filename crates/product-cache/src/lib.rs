//! A cache-aside layer for a DynamoDB product table, kept fresh from the table's stream.
//!
//! Two Lambda functions share this library: the read path answers `GET /products/{id}` from
//! Redis and fills misses from DynamoDB; the invalidator applies the table's DynamoDB Stream to
//! Redis so a changed item is not served stale until its TTL runs out.
//!
//! # Layout
//! - [`acl`]: the Redis permissions the functions need, as ACL rules.
//! - [`config`]: settings from environment variables, validated at cold start.
//! - [`id`]: [`id::ProductId`], the parsed product id, and the cache key it maps to.
//! - [`document`]: the one mapping from a DynamoDB item to the cached JSON document.
//! - [`cache`]: the cache's values and trait, Redis behind it (timeouts, pipelined batches) and
//!   the Lua scripts that make leases and ordering atomic.
//! - [`secrets`]: the Redis AUTH token from Secrets Manager.
//! - [`iam`]: ElastiCache IAM authentication, tokens the function signs itself instead.
//! - [`store`]: the table (`GetItem`).
//! - [`read`]: the read path and its HTTP edge.
//! - [`invalidate`]: stream records to cache deletes or refreshes, with partial batch failures.
//! - [`metrics`]: counts per invocation, written in CloudWatch's Embedded Metric Format.
//! - [`inspect`]: the cache inspector, which compares cached products with the table.
//! - [`startup`]: the functions' state built from settings, the one place clients are made.
//!
//! # Features
//! - `test-support`: the in-memory fakes (`cache::memory`, `store::memory`) and the switches
//!   that turn consistency guards off (`CacheSettings::guards`), for tests only. The functions
//!   are built without it.

pub mod acl;
pub mod cache;
pub mod config;
pub mod document;
pub mod iam;
pub mod id;
pub mod inspect;
pub mod invalidate;
pub mod metrics;
pub mod monitor;
pub mod read;
pub mod secrets;
pub mod startup;
pub mod store;

pub use startup::{
    inspector_from_env, invalidator_from_env, read_path_from_env, sdk_config, startup_failed,
    StartupError,
};
