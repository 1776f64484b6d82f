//! The operator commands' machinery, kept apart from the local stack (crates/local-stack): it
//! acts on real AWS as much as on the local emulation, and the tests use it as a library.
//!
//! # Layout
//! - [`changes`]: `inspect --changes`, the change monitor over a time range of the stream.
//! - [`pages`]: a shard read page by page through the empty pages `GetRecords` may answer
//!   (redrive and the change check both read so).
//! - [`redrive`]: the failed batches of the invalidator's on-failure destination (its SQS queue,
//!   or the local stack's file), read again from the stream and applied through the invalidator
//!   (or purged, past the stream's retention).
//! - [`warm`]: cache warming through the read path's lease-guarded fill.
//!
//! The command line itself (`src/main.rs` and its modules) only parses, dispatches and prints.

pub mod changes;
pub mod pages;
pub mod redrive;
pub mod warm;
