//! The covet.agent.v1 contract, generated from `proto/covet/agent/v1/*.proto`.
//!
//! The `.proto` files are the public API; this crate only carries the
//! generated Rust types, clients and servers, the descriptor set served
//! over gRPC reflection, and the roles a client certificate grants.

// A panic on a daemon or CLI path loses the operation: errors are returned.
// Test code (compiled only under cfg(test)) may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![allow(clippy::all, missing_docs)]

mod role;
pub use role::{Role, UnknownRole};

pub mod v1 {
    tonic::include_proto!("covet.agent.v1");
}

/// Encoded `FileDescriptorSet` of every covet.agent.v1 file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/covet_descriptor.bin"));

/// Fully qualified names of every service in the contract.
pub const SERVICE_NAMES: &[&str] = &[
    "covet.agent.v1.InfoService",
    "covet.agent.v1.MetricsService",
    "covet.agent.v1.ProbeService",
    "covet.agent.v1.UnitService",
    "covet.agent.v1.LogService",
    "covet.agent.v1.OperationService",
    "covet.agent.v1.BackupService",
    "covet.agent.v1.UpgradeService",
];
