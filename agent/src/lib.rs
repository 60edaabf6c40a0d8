//! covet-agent: the host agent behind the covet.agent.v1 gRPC API.
//!
//! The layers, outermost first (ARCHITECTURE.md has the code map):
//! - `edge`: TLS, identity, limits, audit and authz as tower layers, and the
//!   gRPC services (`edge::api`) that parse requests into domain values.
//! - `server`: wires the edge, the operation runner and the capabilities.
//! - `workflow`: the upgrade and rollback runbook as typed steps.
//! - `ops`: the operation log (redb), the runner and the app locks.
//! - capabilities: `backup`, `packages`, `db`, `probes`, `analysis` (metric
//!   analysis against a baseline), `archive`; `series`, the agent's own
//!   Prometheus series.
//! - `host`: what the agent drives on the machine (systemd, journald,
//!   processes, env files, metrics) and `files`, the file-system helpers.
//!
//! Only `edge` knows gRPC.
// A panic on a daemon or CLI path loses the operation: errors are returned.
// Test code (compiled only under cfg(test)) may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
pub(crate) mod analysis;
pub mod archive;
pub mod backup;
pub mod config;
pub mod db;
pub(crate) mod deploy;
pub mod edge;
pub mod files;
#[cfg(test)]
mod fuzzing;
pub mod host;
pub(crate) mod names;
pub mod ops;
pub mod packages;
pub(crate) mod probes;
pub(crate) mod series;
pub mod server;
pub(crate) mod workflow;
