//! One module per figure of the table; each function runs one figure on one network
//! and returns its rows.

pub mod batch;
pub mod batch_read;
pub mod change_monitor;
pub mod cluster;
pub mod cold;
pub mod degraded;
pub mod ecpu;
pub mod eviction_guard;
pub mod flash_sale;
pub mod game_day;
pub mod hit;
pub mod memory;
pub mod miss;
