//! The Lua scripts, loaded from the `.lua` files beside this one so they read (and diff) as Lua.
//!
//! Each runs atomically on the node that owns the item's slot: that atomicity is what lets a
//! lease be checked and a value written as one step, or a position compared and recorded as one.

use std::sync::OnceLock;

/// `newer(a, b)`, shared by the scripts that compare positions.
const NEWER: &str = include_str!("newer.lua");
/// `now_ms()`, `held(lease, now)` and `holds(lease, token, now)`, shared by the scripts that
/// take, check or hand back a lease.
const LEASE: &str = include_str!("lease.lua");
const PROBE: &str = include_str!("probe.lua");
const FILL: &str = include_str!("fill.lua");
const APPLY: &str = include_str!("apply.lua");
const RELEASE: &str = include_str!("release.lua");

pub(crate) struct Scripts {
    pub probe: redis::Script,
    pub fill: redis::Script,
    pub apply: redis::Script,
    pub release: redis::Script,
}

/// Built once per process: a `Script` hashes its source, and the hash is what EVALSHA sends.
pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        probe: redis::Script::new(&format!("{LEASE}{PROBE}")),
        fill: redis::Script::new(&format!("{NEWER}{LEASE}{FILL}")),
        apply: redis::Script::new(&format!("{NEWER}{APPLY}")),
        release: redis::Script::new(&format!("{LEASE}{RELEASE}")),
    })
}
