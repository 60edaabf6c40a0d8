//! covet-agent: the host agent behind the covet.agent.v1 gRPC API.
//!
//! Capability modules (`metrics`, `probes`, ...) know nothing of gRPC; the
//! `api` module maps proto messages to and from their domain types, and the
//! `server` module wires TLS, the tower layers (`authz`, `audit`) and the
//! services together.

// A panic on a daemon or CLI path loses the operation: errors are returned.
// Test code (compiled only under cfg(test)) may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod api;
pub mod audit;
pub mod authz;
pub mod backup;
pub mod config;
pub mod db;
pub mod envfile;
pub mod fsutil;
#[cfg(test)]
mod fuzzing;
pub mod identity;
pub mod info;
pub mod journal;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod packages;
pub mod private;
pub mod probes;
pub mod process;
pub mod safefs;
pub mod server;
pub mod systemd;
pub mod tls;
pub mod workflow;
