//! Integration tests: one binary, so the suites share one compile and one moto server.
//!
//! Needs `redis-server` and `.venv/bin/moto_server` (`scripts/setup.sh` installs both).
//! `TEST_LOG=debug` shows the handlers' logs.

mod aws_proxy;
mod aws_timeouts;
mod batch_read;
mod breaker;
mod checker;
mod cluster_and_auth;
mod connections;
mod consistency;
mod deferred_fill;
mod end_to_end;
mod eviction;
mod failure_paths;
mod freeze;
mod iam;
mod inspector;
mod invalidator;
mod lambda_binaries;
mod leases;
mod local_stack;
mod metrics;
mod monitor;
mod monitor_cli;
mod on_serverless;
mod operator;
mod poller;
mod read_path;
mod replicas;
mod serverless;
mod support;
mod topology;
mod valkey;
