//! The whole system in one process: Redis and DynamoDB (children started here unless given),
//! the table with a sample catalog, the read function's handler behind local HTTP, and the
//! invalidator fed from the table's stream by the local event source mapping.
//!
//! Split by job: `lifecycle` starts, runs and stops it; `settings` is what its functions are
//! configured with; `status` is what it shows while it runs; `state` is the file other commands
//! find it by. The re-exports keep one path,
//! `local_stack::stack::*`, for all of it.

mod lifecycle;
mod settings;
mod state;
mod status;

pub use lifecycle::{
    change_monitor_esm, Stack, StackError, StackOptions, DEFAULT_LISTEN, DEFAULT_TABLE,
    LOCAL_POLL_INTERVAL,
};
pub use settings::{Difference, FunctionVariables, SettingsError};
pub use state::{StackState, StateError};
pub use status::{describe_esm, Stats, StatusStyle};
