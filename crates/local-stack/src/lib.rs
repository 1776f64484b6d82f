//! Runs the whole system on one machine: real `redis-server` and `moto_server` (DynamoDB and
//! DynamoDB Streams) processes, the table with its stream, and the stream read the way Lambda's
//! event source mapping reads it. Tests use the same pieces.
//!
//! # Layout
//! - [`poller`]: the DynamoDB event source mapping, emulated: batches, retries, bisection, limits.
//! - [`demo`]: a one-shot walk of a price change through the whole system.
//! - [`services`]: spawns throwaway `redis-server` and `moto_server` children on free ports.
//! - [`table`]: SDK configuration for a local endpoint; creates the table with its stream.
//! - [`stream`]: reads the table's stream and builds the event JSON Lambda would deliver.
//!
//! Install both server binaries with `scripts/setup.sh`.

pub mod demo;
pub mod poller;
pub mod services;
pub mod stream;
pub mod table;
