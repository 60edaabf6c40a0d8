//! What the agent drives on the machine: systemd over D-Bus, journald,
//! external programs, system users, env files, sd_notify, host facts and
//! metrics.
//! Nothing here knows of apps' upgrades or of gRPC.

pub mod envfile;
pub(crate) mod info;
pub(crate) mod journald;
pub(crate) mod metrics;
pub mod notify;
pub mod process;
pub(crate) mod systemd;
pub(crate) mod users;
