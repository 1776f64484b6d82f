//! Layer 3: the operations, each a short composition of the topology (which node) and the call
//! (how it is sent), both in `node/`.
//!
//! - `read.rs`: a key's value, many keys' values, the probe that takes a miss's lease (one and
//!   many), the fill under the lease, and handing a lease back.
//! - `apply.rs`: the invalidator's batches: ops grouped by node and hash slot, the apply script
//!   per slot, in flight together, failures reported exactly; `deletes.rs`: a single node's
//!   deletes without the script; `confirm.rs`: replicas confirming a batch (`WAIT`).
//! - `inspect.rs`: what the inspector and the operator commands ask: a sample of keys from
//!   every primary, many keys' values and positions, purging keys, declaring a Redis empty.
//! - `scripts.rs` and the `.lua` files beside it: the scripts that make leases and ordering
//!   atomic.

use std::time::Duration;

use super::node::call::Caller;
use super::Guards;

pub(crate) mod apply;
pub(crate) mod confirm;
mod deletes;
pub(crate) mod inspect;
pub(crate) mod read;
mod scripts;

/// What every operation needs: the calls, and the bounds and guards it runs with.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub caller: Caller,
    /// Bound on every call on a request's path; a call that runs out bypasses the cache.
    pub timeout: Duration,
    /// Bound on forming a connection, which a batch waits for (a read bypasses instead).
    pub connect_timeout: Duration,
    pub guards: Guards,
    /// ElastiCache Serverless. Its `maxmemory-policy` is `volatile-lru`, which evicts only keys
    /// with a TTL, and which `INFO` fields it returns is not documented: so positions are kept
    /// without a TTL there (never evicted, the eviction guard's job done by construction; each
    /// costs its 165 bytes for as long as the cache lives), and the apply script does not read
    /// `INFO`. A lost position is then only ever a data loss, which the slots' epochs cover.
    pub serverless: bool,
}

impl Ctx {
    /// How long a position (`{key}:ver`) lives, in seconds; 0 for no TTL: on serverless, where
    /// that is the eviction guard (switched off with it, for the tests that show it matters).
    pub fn position_ttl(&self) -> u64 {
        if self.serverless && self.guards.evictions {
            0
        } else {
            super::VERSION_TTL.as_secs()
        }
    }
}

pub(crate) fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

/// A TTL in whole seconds, at least one.
pub(crate) fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}
