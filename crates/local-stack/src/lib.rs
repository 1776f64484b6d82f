//! Runs the whole system on one machine: real `redis-server` and `moto_server` (DynamoDB and
//! DynamoDB Streams) processes, the table with its stream, the read function's handler behind
//! local HTTP, and the stream read the way Lambda's event source mapping reads it. Tests use the
//! same pieces, and so does the `pcache` command (crates/pcache), which adds the command line
//! and the operator commands that act on real AWS as well (warm, redrive).
//!
//! # Layout
//! - [`stack`]: [`stack::Stack`], everything below wired into one running system, split by job:
//!   its lifecycle (start, run until stopped or failed, shut down), what it shows (the banner and
//!   the status line), and the state file the operator commands find it by.
//! - [`http`]: the read path over HTTP, with requests shaped as API Gateway (HTTP API) sends them.
//! - [`seed`]: the deterministic sample catalog, batch writes, and the `set-price` change.
//! - [`esm_template`]: the invalidator's event source mapping, read from the SAM template.
//! - [`poller`]: the local event source mapping: batches, retries, bisection, on-failure file.
//! - [`demo`]: a one-shot walk of a price change through the whole system.
//! - [`services`]: spawns throwaway `redis-server` and `moto_server` children on free ports.
//! - [`table`]: SDK configuration for a local endpoint; creates the table with its stream.
//! - [`stream`]: reads the table's stream and builds the event JSON Lambda would deliver.
//! - [`error`]: the one formatter of an error and its causes on one line.
//! - [`proxy`]: a TCP proxy adding network delay (ElastiCache in another AZ) and counting round
//!   trips; [`services`] puts one in front of a Redis or of every node of a Redis Cluster.
//! - [`runtime_api`]: a minimal Lambda Runtime API (and Extensions API) to run the compiled
//!   function binaries under, with Lambda's lifecycle and, optionally, its freezes.
//! - [`function`]: a compiled function binary started under its own [`runtime_api`] with the
//!   environment Lambda sets, for the tests and the cold-start benchmark.
//!
//! Install both server binaries with `scripts/setup.sh`.

pub mod demo;
pub mod error;
pub mod esm_template;
pub mod function;
pub mod http;
pub mod poller;
pub mod proxy;
pub mod runtime_api;
pub mod seed;
pub mod services;
pub mod stack;
pub mod stream;
pub mod table;
