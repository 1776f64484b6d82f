//! Throwaway local services for integration tests.
//!
//! The [`services`] module spawns a real `redis-server` and a real `moto_server`
//! (DynamoDB and DynamoDB Streams) as child processes on free loopback ports, so
//! tests exercise the same wire protocols as production without any shared,
//! long-lived infrastructure. Install both binaries with `scripts/setup.sh`.

pub mod services;
